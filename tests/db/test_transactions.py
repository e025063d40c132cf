"""Transaction behaviour: commit/rollback, read-only reads, concurrent writers, and what
callers see when the database is unreachable or locked."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from ca_server.db import ReadOnlyTransactionError, Store, Tx, make_engine, migrate, sqlite_url
from ca_server.db.store import WriteLockBusy
from ca_server.domain import CertificateRecord, JoinToken
from ca_server.errors import Unavailable
from tests.db.builders import T0, audit_event, authority, certificate, entry, join_token, node
from tests.support.postgres import PostgresServer, free_port


class Boom(Exception):
    pass


def _write_everything_then_fail(store: Store, token: JoinToken, cert: CertificateRecord) -> None:
    with store.transaction() as tx:
        tx.add_join_token(token)
        tx.upsert_node(node())
        tx.add_entry(entry())
        tx.add_certificates([cert])
        tx.add_authority(authority())
        tx.add_audit_events([audit_event()])
        tx.bump_bundle_version()
        raise Boom


def test_exception_inside_transaction_leaves_nothing_behind(store: Store) -> None:
    token, cert = join_token(), certificate()
    with pytest.raises(Boom):
        _write_everything_then_fail(store, token, cert)
    with store.read() as tx:
        assert tx.get_join_token(token.token_hash) is None
        assert tx.count_nodes() == 0
        assert tx.count_entries() == 0
        assert tx.get_certificate(cert.serial) is None
        assert tx.list_authorities() == []
        assert tx.list_audit_events(limit=10) == []
        assert tx.bundle_version() == 0


def test_normal_exit_commits(store: Store) -> None:
    with store.transaction() as tx:
        tx.upsert_node(node())
    with store.read() as tx:
        assert tx.count_nodes() == 1


WRITES: dict[str, Callable[[Tx], object]] = {
    "add_join_token": lambda tx: tx.add_join_token(join_token()),
    "consume_join_token": lambda tx: tx.consume_join_token("aa", T0),
    "prune_join_tokens": lambda tx: tx.prune_join_tokens(T0),
    "upsert_node": lambda tx: tx.upsert_node(node()),
    "set_node_certificate": lambda tx: tx.set_node_certificate("web-1", "aa", T0, T0),
    "touch_node": lambda tx: tx.touch_node("web-1", T0),
    "ban_node": lambda tx: tx.ban_node("web-1", T0),
    "add_entry": lambda tx: tx.add_entry(entry()),
    "delete_entry": lambda tx: tx.delete_entry("x"),
    "add_certificates": lambda tx: tx.add_certificates([certificate()]),
    "revoke_certificate": lambda tx: tx.revoke_certificate("aa", T0, "x"),
    "revoke_node_certificates": lambda tx: tx.revoke_node_certificates("web-1", T0, "x"),
    "prune_certificates": lambda tx: tx.prune_certificates(T0),
    "add_authority": lambda tx: tx.add_authority(authority()),
    "set_authority_state": lambda tx: tx.set_authority_state("a", "retired", T0),
    "add_audit_events": lambda tx: tx.add_audit_events([audit_event()]),
    "bump_bundle_version": lambda tx: tx.bump_bundle_version(),
}


def test_read_transactions_refuse_every_write_method(store: Store) -> None:
    for method, call in WRITES.items():
        with store.read() as tx, pytest.raises(ReadOnlyTransactionError, match=method):
            call(tx)


def test_read_transactions_are_read_only_in_the_database_too(store: Store) -> None:
    """Even SQL that bypasses the Tx methods cannot write inside read()."""
    with store.read() as tx:
        assert not tx.writable
        with pytest.raises(sa_exc.DBAPIError):
            tx._conn.execute(text("UPDATE trust_state SET bundle_version = 99"))
    with store.read() as tx:
        assert tx.bundle_version() == 0


def test_a_connection_used_for_reading_can_write_afterwards(database_url: str) -> None:
    """The read-only mode must not stick to the pooled connection."""
    engine = make_engine(database_url, pool_size=1)
    migrate.upgrade(engine)
    one_connection = Store(engine)
    try:
        for round_number in range(1, 4):
            with one_connection.read() as tx:
                tx.bundle_version()
            with one_connection.transaction() as tx:
                assert tx.bump_bundle_version() == round_number
    finally:
        one_connection.close()


def test_read_then_write_transactions_do_not_deadlock(store: Store) -> None:
    """Many writers that read first: with a deferred BEGIN, SQLite's SHARED -> RESERVED
    upgrade makes some fail at once with "database is locked"; BEGIN IMMEDIATE queues
    them instead."""
    workers, per_worker = 6, 15

    def work(worker: int) -> None:
        for i in range(per_worker):
            with store.transaction() as tx:
                seen = tx.bundle_version()
                tx.add_audit_events([audit_event(subject=f"{worker}-{i}", details={"v": seen})])
                tx.bump_bundle_version()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(workers)))
    with store.read() as tx:
        assert tx.bundle_version() == workers * per_worker
        assert len(tx.list_audit_events(limit=1000)) == workers * per_worker


def test_reads_see_one_snapshot(store: Store) -> None:
    with store.read() as reader:
        before = reader.count_nodes()
        with store.transaction() as writer:
            writer.upsert_node(node("late"))
        assert reader.count_nodes() == before
        assert reader.get_node("late") is None
    with store.read() as reader:
        assert reader.get_node("late") is not None


def test_unreachable_postgres_is_unavailable_without_leaking_the_password() -> None:
    url = f"postgresql+psycopg://meshtls:s3cret-pw@127.0.0.1:{free_port()}/ca"
    store = Store(make_engine(url, connect_timeout=2))
    try:
        for open_tx in (store.transaction, store.read):
            with pytest.raises(Unavailable) as failure, open_tx():
                pass
            assert failure.value.message.startswith("database unavailable: ")
            assert "s3cret-pw" not in failure.value.message
            assert failure.value.retry_after is not None
        with pytest.raises(Unavailable):
            migrate.upgrade(url)
    finally:
        store.close()
    assert "s3cret-pw" not in store.url


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_store_recovers_after_the_server_drops_its_connections(
    store: Store, database_url: str, postgres_server: PostgresServer
) -> None:
    with store.transaction() as tx:
        tx.upsert_node(node())
    database = database_url.rsplit("/", 1)[1]
    admin = make_engine(postgres_server.admin_url, pool_size=1)
    try:
        with admin.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db"
                ),
                {"db": database},
            ).scalar_one()
        assert killed >= 1
    finally:
        admin.dispose()
    with store.read() as tx:
        assert tx.count_nodes() == 1


def test_locked_sqlite_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ca.db"
    migrate.upgrade(sqlite_url(path))
    store = Store(make_engine(sqlite_url(path), sqlite_busy_timeout=0.2))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with (
            pytest.raises(Unavailable, match="database unavailable: database is locked"),
            store.transaction() as tx,
        ):
            tx.bump_bundle_version()
        holder.execute("ROLLBACK")
        with store.transaction() as tx:
            assert tx.bump_bundle_version() == 1
    finally:
        holder.close()
        store.close()


def test_a_no_wait_write_on_a_locked_sqlite_database_fails_at_once(tmp_path: Path) -> None:
    path = tmp_path / "ca.db"
    migrate.upgrade(sqlite_url(path))
    store = Store(make_engine(sqlite_url(path), sqlite_busy_timeout=5))
    holder = sqlite3.connect(path, isolation_level=None)
    ran = False
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(WriteLockBusy), store.transaction(wait=False):
            ran = True
        assert time.monotonic() - started < 1  # not the 5 s busy timeout
        holder.execute("ROLLBACK")
        with store.transaction(wait=False) as tx:
            assert tx.bump_bundle_version() == 1
    finally:
        holder.close()
        store.close()
    assert not ran
