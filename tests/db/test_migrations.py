"""Migrations: they build exactly the schema the models describe, report their state,
run once under concurrency, and downgrade cleanly."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from ca_server.db import make_engine, migrate
from ca_server.db.models import metadata

REPO_ROOT = Path(__file__).resolve().parents[2]

TABLES = {
    "join_tokens",
    "nodes",
    "entries",
    "certificates",
    "authorities",
    "audit_events",
    "trust_state",
}


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert migrate.upgrade(engine) == migrate.all_revisions()
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, metadata)
            indexes = {
                index["name"] for name in TABLES for index in inspect(conn).get_indexes(name)
            }
    finally:
        engine.dispose()
    assert differences == []
    assert {
        "ix_entries_node_name",
        "ix_certificates_node_name",
        "ix_certificates_spiffe_id",
        "ix_certificates_not_after",
        "ix_audit_events_at",
    } <= indexes


def test_revision_state_is_reported(database_url: str) -> None:
    head = migrate.head_revision()
    assert migrate.current_revision(database_url) is None
    assert migrate.pending_revisions(database_url) == migrate.all_revisions()
    assert migrate.upgrade(database_url) == migrate.all_revisions()
    assert migrate.all_revisions()[-1] == head
    assert migrate.current_revision(database_url) == head
    assert migrate.pending_revisions(database_url) == []
    assert migrate.upgrade(database_url) == []


# A CA process in miniature: import and connect, say "ready", wait for the go signal (the
# file named by argv[2] appearing), then migrate and print what it applied.
MIGRATING_PROCESS = """
import sys, time
from pathlib import Path
from ca_server.db import make_engine, migrate
engine = make_engine(sys.argv[1])
engine.connect().close()
migrate.head_revision()
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.0005)
print(" ".join(migrate.upgrade(engine)) or "up to date", flush=True)
"""


def test_concurrent_upgrades_apply_each_revision_once(database_url: str, tmp_path: Path) -> None:
    """Two CA processes migrating an empty database at the same moment: one applies the
    revisions, the other waits for it (database lock) and finds nothing left to do."""
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATING_PROCESS, database_url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            if line != "ready":
                process.wait(timeout=30)
                assert process.stderr is not None
                raise AssertionError(f"a migrating process did not start: {process.stderr.read()}")
        go.touch()
        outputs = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr
            outputs.append(stdout.strip())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert sorted(outputs) == sorted([" ".join(migrate.all_revisions()), "up to date"])
    assert migrate.current_revision(database_url) == migrate.head_revision()


def test_upgrades_from_threads_are_serialised(database_url: str) -> None:
    barrier = threading.Barrier(3)

    def run(_: int) -> list[str]:
        barrier.wait(timeout=30)
        return migrate.upgrade(database_url)

    with ThreadPoolExecutor(3) as pool:
        results = sorted(pool.map(run, range(3)))
    assert results == [[], [], migrate.all_revisions()]


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn, conn.begin():
            command.downgrade(migrate.alembic_config(conn), "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        assert migrate.upgrade(engine) == migrate.all_revisions()
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()
