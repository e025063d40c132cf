#!/usr/bin/env bash
# Install the Debian packages the test suite drives as outside parts, when missing:
# PostgreSQL (database tests), openssl and curl (outside peers), sslscan (TLS scan of the
# proxy) and stunnel4 (the data-plane bench's comparison).
set -euo pipefail
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v sslscan >/dev/null 2>&1 || missing+=(sslscan)
command -v stunnel4 >/dev/null 2>&1 || missing+=(stunnel4)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "missing Debian packages: ${missing[*]} (install them, or run as root)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "==> installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
