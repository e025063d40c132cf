"""The session's PostgreSQL fixture when PostgreSQL is missing (a clear failure under CI,
a skip elsewhere, both naming the script that installs it), and the benchmarks' WAL
warm-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.support.postgres import BIN_DIR_ENV, PostgresServer

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


@pytest.mark.postgres
def test_recycle_wal_leaves_segments_ready_ahead_of_the_log(
    postgres_server: PostgresServer,
) -> None:
    """The benchmarks' server starts with WAL segments to recycle, as a server that has
    been running has: files named after segments the log has not reached yet."""
    future_segments = (
        "SELECT count(*) FROM pg_ls_waldir() "
        "WHERE name ~ '^[0-9A-F]{24}$' AND name > pg_walfile_name(pg_current_wal_lsn())"
    )
    postgres_server.recycle_wal(12)
    with psycopg.connect(postgres_server.admin_url.replace("+psycopg", "")) as conn:
        row = conn.execute(future_segments.encode()).fetchone()
    assert row is not None
    assert row[0] >= 12, f"{row[0]} segments ahead of the log"
