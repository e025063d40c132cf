#!/usr/bin/env bash
# The whole test suite: system packages, virtualenv, generated-code drift, lint, format,
# types, then pytest (SQLite and a real PostgreSQL started by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/bootstrap.sh
VENV="${VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"

echo "==> generated protobuf code matches proto/"
python proto/gen.py --check
echo "==> ruff"
ruff check .
ruff format --check .
echo "==> mypy"
mypy ca_server sidecar proto/meshtls scripts tests bench
echo "==> pytest"
python -m pytest -q -p no:cacheprovider "$@"
