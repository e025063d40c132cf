"""Pushed trust changes between CA replicas (PostgreSQL LISTEN/NOTIFY) and the signing
fence that bounds how stale a replica's signer can be.

The replicas here confirm their view by polling only every 30 s, so whatever reaches
the other replica in under a second was pushed. The fence test holds a lock on the
trust-state row's table, so a replica cannot confirm its view while issuance itself still
works: it must refuse to sign once its view is older than `trust_poll_interval`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from ca_server.authority.kek import generate_kek_file
from ca_server.db import Store, make_engine, migrate
from ca_server.db.notify import TRUST_CHANNEL, listen_connect_kwargs, notify_trust_changed
from ca_server.errors import Unavailable
from ca_server.services.context import CAContext
from ca_server.services.signing_fence import SigningFence
from meshtls.v1 import agent_pb2_grpc
from tests.ca.helpers import enroll_node, key_and_csr, node_channel, sign_one, wait_for
from tests.support.ca import RunningCA, running_ca

PUSH_WITHIN = 1.0  # seconds; the poll alone would take up to 30 s here


@asynccontextmanager
async def replicas(
    tmp_path: Path, url: str, count: int = 2, poll: float = 120.0
) -> AsyncIterator[list[RunningCA]]:
    kek = tmp_path / "kek"
    generate_kek_file(kek)
    async with AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(
                running_ca(
                    tmp_path / f"r{i}",
                    database_url=url,
                    kek_file=kek,
                    dev=False,
                    trust_poll_interval=poll,
                )
            )
            for i in range(count)
        ]
        yield started


def _test_connection(url: str) -> dict[str, Any]:
    return {**listen_connect_kwargs(url), "application_name": "meshtls-test"}


def _ctx(ca: RunningCA) -> CAContext:
    assert ca.server is not None
    assert ca.server.ctx is not None
    return ca.server.ctx


async def _timed(predicate_name: str, check: Callable[[], bool]) -> float:
    started = time.monotonic()

    async def holds() -> bool:
        return check()

    await wait_for(holds, within=5, what=predicate_name)
    return time.monotonic() - started


@pytest.mark.postgres
async def test_revocation_and_forced_rotation_are_pushed_to_the_other_replica(
    tmp_path: Path, postgres_server: object
) -> None:
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    async with replicas(tmp_path, url) as (a, b):
        assert b.server is not None
        assert b.server.trust_listener is not None
        await wait_for(
            lambda: _async_true(b.server.trust_listener.connected),  # type: ignore[union-attr]
            what="b's listener",
        )
        node = await enroll_node(b, "web-1")
        serial = format(node.cert.serial_number, "x")
        await a.revoke(serial)
        took = await _timed(
            "b to hear of the revocation",
            lambda: serial in {r.serial for r in _ctx(b).trust.snapshot.revoked},
        )
        assert took < PUSH_WITHIN, f"revocation reached b after {took:.2f}s"

        assert a.server is not None
        assert a.server.authorities is not None
        await a.server.authorities.request_rotation(immediate=True)
        new_signer = _ctx(a).trust.keyring.signer.authority_id
        took = await _timed(
            "b to sign with a's new authority",
            lambda: _ctx(b).trust.keyring.signer.authority_id == new_signer,
        )
        assert took < PUSH_WITHIN, f"rotation reached b after {took:.2f}s"
        enrolled = await enroll_node(b, "web-2")
        assert enrolled.chain[1] == _ctx(a).trust.keyring.signer.cert


async def _async_true(value: bool) -> bool:
    return value


@pytest.mark.postgres
async def test_the_listener_reconnects_after_its_connection_is_killed(
    tmp_path: Path, postgres_server: object
) -> None:
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    async with replicas(tmp_path, url) as (a, b):
        assert b.server is not None
        listener = b.server.trust_listener
        assert listener is not None
        await wait_for(lambda: _async_true(listener.connected), what="b's listener")
        first = listener.connects
        with psycopg.connect(**_test_connection(url), autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'meshtls-ca-listen' AND datname = current_database()"
            ).fetchone()
        assert killed is not None
        assert killed[0] == 2  # one listener per replica
        await wait_for(
            lambda: _async_true(listener.connects > first and listener.connected),
            within=10,
            what="b's listener to reconnect",
        )
        node = await enroll_node(a, "web-1")
        serial = format(node.cert.serial_number, "x")
        await a.revoke(serial)
        took = await _timed(
            "b to hear of the revocation after reconnecting",
            lambda: serial in {r.serial for r in _ctx(b).trust.snapshot.revoked},
        )
        assert took < PUSH_WITHIN, f"revocation reached b after {took:.2f}s"


@pytest.mark.postgres
def test_a_notification_is_sent_only_when_its_transaction_commits(
    postgres_server: object,
) -> None:
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    engine = make_engine(url)
    migrate.upgrade(engine)
    store = Store(engine)
    try:
        with psycopg.connect(**_test_connection(url), autocommit=True) as listener:
            listener.execute(f"LISTEN {TRUST_CHANNEL}")
            with pytest.raises(RuntimeError):
                _notify_then_fail(store)
            with store.transaction() as tx:
                tx.bump_bundle_version()
                committed = notify_trust_changed(tx)
            received = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert committed == 1  # the rolled-back bump never happened
        assert received == ["1"]
    finally:
        store.close()


def _notify_then_fail(store: Store) -> None:
    with store.transaction() as tx:
        tx.bump_bundle_version()
        notify_trust_changed(tx)
        raise RuntimeError("roll back")


def test_the_fence_closes_when_the_view_is_older_than_its_limit() -> None:
    now = [100.0]
    fence = SigningFence(1.0, monotonic=lambda: now[0])
    fence.check("a")  # never confirmed: the keyring was just built from the database
    fence.confirm(fence.mark())
    now[0] = 100.9
    fence.check("a")
    fence.confirm(99.0)  # an older read confirms nothing newer
    now[0] = 101.2
    with pytest.raises(Unavailable, match=r"could not confirm for 1\.2s") as refused:
        fence.check("a")
    assert refused.value.retry_after == 0.5
    fence.confirm(101.1)
    fence.check("a")


@pytest.mark.postgres
async def test_a_replica_that_cannot_confirm_its_view_stops_signing(
    tmp_path: Path, postgres_server: object
) -> None:
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    async with replicas(tmp_path, url, count=1, poll=1.0) as (ca,):
        node = await enroll_node(ca, "web-0")
        entry_id = await ca.create_entry("spiffe://example.org/svc/web", "web-0")
        async with node_channel(ca, node) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            await sign_one(stub, entry_id, key_and_csr()[1])  # the node's answers are cached
            with psycopg.connect(**_test_connection(url)) as blocker:
                # Reads of the trust state wait behind this lock; issuing to a node the CA
                # has cached does not touch it.
                blocker.execute("LOCK TABLE trust_state IN ACCESS EXCLUSIVE MODE")
                locked_at = time.monotonic()
                refusal: grpc.aio.AioRpcError | None = None
                for _ in range(100):
                    try:
                        await sign_one(stub, entry_id, key_and_csr()[1])
                    except grpc.aio.AioRpcError as exc:
                        refusal = exc
                        break
                    await asyncio.sleep(0.05)
                refused_after = time.monotonic() - locked_at
                blocker.rollback()
        assert refusal is not None
        assert refusal.code() == grpc.StatusCode.UNAVAILABLE
        assert "could not confirm" in (refusal.details() or "")
        assert refused_after < 1.0 + 1.0, refused_after  # the limit, plus scheduling slack

        async def signs_again() -> bool:  # confirmed again once the lock is gone
            try:
                await enroll_node(ca, f"web-after-{time.monotonic_ns()}")
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                return False
            return True

        codes: list[grpc.StatusCode] = []

        await wait_for(signs_again, within=5, what="signing to resume")
        assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}
