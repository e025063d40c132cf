"""The issuance benchmark starts each row on a settled database (`bench.issuance.settle`):
what the rows before it wrote is vacuumed and analyzed on PostgreSQL, and SQLite's
write-ahead log is checkpointed into the database file."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from bench.issuance import settle
from tests.support.postgres import PostgresServer

ROWS = 5_000


@pytest.mark.postgres
def test_settle_vacuums_and_analyzes_what_postgres_was_given(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    database = url.rsplit("/", 1)[1]
    try:
        with postgres_server.connect(database) as conn:
            conn.execute(b"CREATE TABLE issued (serial text PRIMARY KEY, pem text)")
            conn.execute(
                b"INSERT INTO issued SELECT md5(i::text), repeat('x', 800) "
                b"FROM generate_series(1, %d) AS i" % ROWS
            )
        settle(url, tmp_path)
        with postgres_server.connect(database) as conn:
            row = conn.execute(
                b"SELECT last_vacuum IS NOT NULL, last_analyze IS NOT NULL, "
                b"n_mod_since_analyze, reltuples "
                b"FROM pg_stat_user_tables JOIN pg_class ON pg_class.oid = relid "
                b"WHERE pg_class.relname = 'issued'"
            ).fetchone()
    finally:
        postgres_server.drop_database(url)
    assert row == (True, True, 0, ROWS), f"vacuumed, analyzed, changed since, rows: {row}"


def test_settle_checkpoints_sqlites_write_ahead_log(tmp_path: Path) -> None:
    database = tmp_path / "ca.db"
    wal = tmp_path / "ca.db-wal"
    # A connection stays open (as the CA's do), so closing the last one does not
    # checkpoint the log in settle's place.
    with closing(sqlite3.connect(database)) as writer:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("CREATE TABLE issued (serial TEXT PRIMARY KEY, pem TEXT)")
        with writer:
            writer.executemany(
                "INSERT INTO issued VALUES (?, ?)", ((f"{i:032x}", "x" * 800) for i in range(ROWS))
            )
        assert wal.stat().st_size > ROWS * 800, "the rows are in the log, not yet in the file"
        settle(None, tmp_path)
        assert wal.stat().st_size == 0
        # The log is empty, so the rows a new reader sees are in the database file.
        with closing(sqlite3.connect(database)) as reader:
            assert reader.execute("SELECT count(*) FROM issued").fetchone() == (ROWS,)
