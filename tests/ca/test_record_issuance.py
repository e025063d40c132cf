"""Recording issuances through the group-commit writer, on both databases: SQLite runs the
ban check and both inserts in a transaction, PostgreSQL as one atomic statement
(`Store.record_issuances`). Either way a banned node's request is refused and writes
nothing, a duplicate serial takes only its own request down, and every row that is
written reads back as it went in. On PostgreSQL the statement has a connection of its
own: it is replaced, before anything is sent, when the server ended its session; one
lost while a statement is in flight fails that batch as `Unavailable` and the next batch
gets a new connection; a server that cannot be reached is `Unavailable`; a statement
abandoned half-way (a cancelled task) writes nothing and leaves the next one a working
connection."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import LiteralString

import pytest

from ca_server.db import make_engine
from ca_server.db.store import Store
from ca_server.domain import AuditEvent, CertificateRecord
from ca_server.errors import AlreadyExists, PermissionDenied, Unavailable
from ca_server.services.issuing import RecordIssuance
from ca_server.services.writer import Writer, open_writer
from tests.ca.helpers import wait_for
from tests.db.builders import T0, audit_event, certificate, node
from tests.support.postgres import PostgresServer, free_port


@pytest.fixture
async def writer(store: Store) -> AsyncIterator[Writer]:
    with store.transaction() as tx:
        tx.upsert_node(node("web-1"))
        tx.upsert_node(node("web-2"))
        tx.ban_node("web-2", T0)
    writer = open_writer(store)
    writer.start()
    yield writer
    await writer.stop()
    await store.aclose()


def _issuance(node_name: str, count: int) -> RecordIssuance:
    # Times with many digits: they must come back exactly as sent.
    records = tuple(
        certificate(node_name=node_name, not_before=T0 + 1 / 3, issued_at=T0 + 0.1 + i)
        for i in range(count)
    )
    events = tuple(
        audit_event(
            at=T0 + 2 / 3,
            actor=f"spiffe://example.org/meshtls/node/{node_name}",
            action="certificate.issue",
            subject=r.serial,
            details={"node": node_name, "entry": None, "kind": "workload"},
        )
        for r in records
    )
    return RecordIssuance(node_name, records, events)


def _stored(store: Store, records: tuple[CertificateRecord, ...]) -> list[CertificateRecord]:
    with store.read() as tx:
        return [c for r in records if (c := tx.get_certificate(r.serial)) is not None]


def _events(store: Store, serial: str) -> list[AuditEvent]:
    with store.read() as tx:
        return tx.list_audit_events(limit=10, subject=serial)


async def test_a_banned_nodes_request_is_refused_and_the_rest_recorded(
    store: Store, writer: Writer
) -> None:
    first, banned, second = _issuance("web-1", 3), _issuance("web-2", 2), _issuance("web-1", 1)
    outcomes = await asyncio.gather(
        writer.submit(first), writer.submit(banned), writer.submit(second), return_exceptions=True
    )

    assert outcomes[0] is None
    assert isinstance(outcomes[1], PermissionDenied)
    assert "node web-2 is banned" in outcomes[1].message
    assert outcomes[2] is None
    for request in (first, second):
        assert _stored(store, request.records) == list(request.records)
        for record, sent in zip(request.records, request.events, strict=True):
            (event,) = _events(store, record.serial)
            assert (event.at, event.actor, event.action, event.details) == (
                sent.at,
                sent.actor,
                sent.action,
                sent.details,
            )
    assert _stored(store, banned.records) == []
    assert [_events(store, r.serial) for r in banned.records] == [[], []]


async def test_a_duplicate_serial_writes_nothing_of_its_request(
    store: Store, writer: Writer
) -> None:
    taken = _issuance("web-1", 1)
    await writer.submit(taken)
    clashing = _issuance("web-1", 2)
    clashing = RecordIssuance(
        "web-1",
        (clashing.records[0], taken.records[0]),
        (clashing.events[0], taken.events[0]),
    )
    neighbour = _issuance("web-1", 2)

    outcomes = await asyncio.gather(
        writer.submit(clashing), writer.submit(neighbour), return_exceptions=True
    )

    assert isinstance(outcomes[0], AlreadyExists)
    assert outcomes[1] is None
    assert _stored(store, clashing.records[:1]) == []
    assert _events(store, clashing.records[0].serial) == []
    assert len(_events(store, taken.records[0].serial)) == 1
    assert _stored(store, neighbour.records) == list(neighbour.records)


async def test_postgres_records_a_batch_of_issuances_in_one_statement(
    store: Store, writer: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store.dialect != "postgresql":
        pytest.skip("SQLite records issuances in its write transaction")
    statements: list[int] = []
    record = store.record_issuances

    async def counted(
        issuances: list[tuple[str, tuple[CertificateRecord, ...], tuple[AuditEvent, ...]]],
    ) -> set[str]:
        statements.append(len(issuances))
        return await record(issuances)

    monkeypatch.setattr(store, "record_issuances", counted)
    requests = [_issuance("web-1", 2) for _ in range(5)]
    await asyncio.gather(*(writer.submit(r) for r in requests))

    assert sum(statements) == 5  # every request went through the one-statement path
    assert all(_stored(store, r.records) == list(r.records) for r in requests)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("how", ["server ends the session", "network cut"])
async def test_a_connection_lost_mid_statement_fails_its_batch_and_the_next_one_goes_through(
    store: Store, writer: Writer, database_url: str, postgres_server: PostgresServer, how: str
) -> None:
    await writer.submit(_issuance("web-1", 1))  # the issuance connection is open and ready
    lost = _issuance("web-1", 2)
    with _certificates_locked(postgres_server, database_url):
        submitted: asyncio.Task[object] = asyncio.create_task(writer.submit(lost))
        await _until_blocked_on_the_lock(postgres_server)
        if how == "network cut":
            # No goodbye from the server: the socket just ends (the store's connection,
            # reached through its private attribute: there is no other handle on it).
            issuances = store._issuances
            assert issuances is not None
            assert issuances._connection is not None
            with socket.socket(fileno=os.dup(issuances._connection.fileno())) as cut:
                cut.shutdown(socket.SHUT_RDWR)
        else:
            _admin_execute(
                postgres_server,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND wait_event_type = 'Lock'",
                "meshtls-ca",
            )
        with pytest.raises(Unavailable, match="database unavailable"):
            await asyncio.wait_for(submitted, 20)
    after = _issuance("web-1", 1)
    await writer.submit(after)

    assert _stored(store, after.records) == list(after.records)
    if how == "server ends the session":
        assert _stored(store, lost.records) == []


def _admin_execute(
    server: PostgresServer, query: LiteralString, *params: object
) -> list[tuple[object, ...]]:
    with server.connect() as admin:
        return admin.execute(query, params).fetchall()


def _issuance_backends(server: PostgresServer, database_url: str) -> list[int]:
    """The server processes of the store's connections to the test's database (the
    issuance connection's among them, once it was used)."""
    rows = _admin_execute(
        server,
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        _database(database_url),
        "meshtls-ca",
    )
    return [int(str(pid)) for (pid,) in rows]


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_the_issuance_connection_is_replaced_when_the_server_ended_its_session(
    store: Store,
    writer: Writer,
    database_url: str,
    postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = _issuance("web-1", 1)
    await writer.submit(first)
    backends = _issuance_backends(postgres_server, database_url)
    assert backends  # the issuance connection (and any pooled one) is open
    _admin_execute(
        postgres_server, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", backends
    )

    async def gone() -> bool:
        return not _issuance_backends(postgres_server, database_url)

    await wait_for(gone, what="the terminated sessions to end")

    second = _issuance("web-1", 2)
    with caplog.at_level(logging.WARNING, logger="ca_server.db.issuance"):
        await writer.submit(second)  # no error: the dead session was noticed before sending

    (replaced,) = [r for r in caplog.records if r.name == "ca_server.db.issuance"]
    assert replaced.getMessage() == "replacing the issuance database connection"
    assert replaced.__dict__["reason"] == "the server ended the session"

    assert _stored(store, first.records) == list(first.records)
    assert _stored(store, second.records) == list(second.records)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_an_unreachable_server_is_unavailable_without_its_password(
    store: Store, database_url: str
) -> None:
    nowhere = Store(make_engine(f"postgresql://meshtls:s3cret-pw@127.0.0.1:{free_port()}/ca"))
    try:
        with pytest.raises(Unavailable) as failure:
            await nowhere.record_issuances([("web-1", *_parts(_issuance("web-1", 1)))])
    finally:
        await nowhere.aclose()
    assert failure.value.message.startswith("database unavailable: ")
    assert "s3cret-pw" not in failure.value.message
    assert failure.value.retry_after is not None


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_statement_abandoned_half_way_writes_nothing(
    store: Store, writer: Writer, database_url: str, postgres_server: PostgresServer
) -> None:
    await writer.submit(_issuance("web-1", 1))  # the issuance connection is open
    abandoned = _issuance("web-1", 2)
    with _certificates_locked(postgres_server, database_url):
        task = asyncio.create_task(store.record_issuances([("web-1", *_parts(abandoned))]))
        await _until_blocked_on_the_lock(postgres_server)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # The lock is released: an abandoned statement would go on now.
    after = _issuance("web-1", 1)
    await writer.submit(after)

    assert _stored(store, abandoned.records) == []
    assert [_events(store, r.serial) for r in abandoned.records] == [[], []]
    assert _stored(store, after.records) == list(after.records)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_the_issuance_connection_is_kept_past_selects_descriptor_limit(
    store: Store, writer: Writer, database_url: str, postgres_server: PostgresServer
) -> None:
    # A CA serving thousands of sidecars holds descriptors past FD_SETSIZE (1024), where
    # select() cannot look: the idle check must not take that for a dead connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    elif soft < 1200:
        pytest.skip(f"the descriptor limit ({hard}) is below 1200")
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        await writer.submit(_issuance("web-1", 1))
        first = _statement_backends(postgres_server, database_url)
        for _ in range(3):
            await writer.submit(_issuance("web-1", 1))
        assert _statement_backends(postgres_server, database_url) == first
        assert len(first) == 1
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _statement_backends(server: PostgresServer, database_url: str) -> list[int]:
    """The server processes on the test's database whose last statement was the issuance
    statement."""
    rows = _admin_execute(
        server,
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE %s",
        _database(database_url),
        "%json_to_recordset%",
    )
    return sorted(int(str(pid)) for (pid,) in rows)


def _parts(
    request: RecordIssuance,
) -> tuple[tuple[CertificateRecord, ...], tuple[AuditEvent, ...]]:
    return request.records, request.events


def _database(database_url: str) -> str:
    return database_url.rsplit("/", 1)[1]


@contextmanager
def _certificates_locked(server: PostgresServer, database_url: str) -> Iterator[None]:
    """The certificates table locked by another session for the block: a statement that
    writes to it waits until the block ends."""
    with server.connect(_database(database_url), autocommit=False) as holder:
        holder.execute("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE")
        yield
        holder.rollback()


async def _until_blocked_on_the_lock(server: PostgresServer) -> None:
    async def blocked() -> bool:
        rows = _admin_execute(
            server,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'",
            "meshtls-ca",
        )
        return bool(rows[0][0])

    await wait_for(blocked, what="the statement to wait for the table lock")
