"""The session's PostgreSQL fixture when PostgreSQL is missing: a clear failure under CI,
a skip elsewhere, both naming the script that installs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.postgres import BIN_DIR_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
A_POSTGRES_TEST = "tests/db/test_entries.py::test_add_get_and_round_trip_of_lists[postgres]"


def _pytest_without_postgres(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, BIN_DIR_ENV: str(tmp_path / "no-postgres-here"), "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfs", A_POSTGRES_TEST],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("ci", "outcome", "exit_code"), [("true", "1 error", 1), ("", "1 skipped", 0)]
)
def test_missing_postgres_names_the_install_script(
    tmp_path: Path, ci: str, outcome: str, exit_code: int
) -> None:
    """Under CI=true the postgres tests fail (error at setup); elsewhere they skip."""
    result = _pytest_without_postgres(tmp_path, ci)
    report = result.stdout + result.stderr
    assert result.returncode == exit_code, report
    assert outcome in result.stdout, report
    assert "run scripts/system-deps.sh to install them" in result.stdout, report
