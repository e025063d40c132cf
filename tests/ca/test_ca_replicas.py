"""Two CA replicas on one real PostgreSQL: both issue; a rotation requested on both at once
happens once; a forced rotation on one makes the other sign with the new authority, and a
revocation on one reaches the other's trust state, within seconds; a ban or an entry change
on one reaches what the other cached about the node, however young; pruning runs on one
replica at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import pytest

from ca_server.authority.kek import generate_kek_file
from ca_server.errors import FailedPrecondition
from ca_server.services.pruning import prune
from meshtls.clock import Clock, ManualClock
from meshtls.v1 import admin_pb2, agent_pb2, agent_pb2_grpc
from tests.ca.helpers import RPC_TIMEOUT, enroll_node, node_channel, wait_for
from tests.support.ca import RunningCA, running_ca

pytestmark = pytest.mark.postgres


@asynccontextmanager
async def two_replicas(
    tmp_path: Path, database_url: str, *, clock_b: Clock | None = None
) -> AsyncIterator[tuple[RunningCA, RunningCA]]:
    kek = tmp_path / "kek"
    generate_kek_file(kek)
    async with AsyncExitStack() as stack:
        replicas = []
        for name, clock in (("a", None), ("b", clock_b)):
            replicas.append(
                await stack.enter_async_context(
                    running_ca(
                        tmp_path / name,
                        clock=clock,
                        database_url=database_url,
                        kek_file=kek,
                        dev=False,
                        trust_poll_interval=0.2,
                    )
                )
            )
        yield replicas[0], replicas[1]


def _ctx(ca: RunningCA):  # type: ignore[no-untyped-def]
    assert ca.server is not None
    assert ca.server.ctx is not None
    return ca.server.ctx


async def test_replicas_share_issuance_rotation_and_revocation(
    tmp_path: Path, postgres_server: object
) -> None:
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    async with two_replicas(tmp_path, url) as (a, b):
        assert a.bundle_pem == b.bundle_pem
        node_a = await enroll_node(a, "web-a")
        node_b = await enroll_node(b, "web-b")
        assert node_a.chain[1] == node_b.chain[1]  # the same active intermediate

        assert a.server is not None
        assert b.server is not None
        assert a.server.authorities is not None
        assert b.server.authorities is not None
        outcomes = await asyncio.gather(
            a.server.authorities.request_rotation(immediate=False),
            b.server.authorities.request_rotation(immediate=False),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, FailedPrecondition)]
        assert len(refused) == 1, outcomes
        assert "another CA replica" in refused[0].message
        results = [o if isinstance(o, list) else [] for o in outcomes]
        prepares = [act for done in results for act in done if act.kind.startswith("prepare")]
        assert len(prepares) == 1, results
        with _ctx(a).store.read() as tx:
            journal = tx.list_authorities()
        assert sum(x.state == "prepared" for x in journal) == 1

        # The replica that holds the lease may force the activation; the other follows.
        holder = a if any(act.kind.startswith("prepare") for act in results[0]) else b
        other = b if holder is a else a
        assert holder.server is not None
        assert holder.server.authorities is not None
        await holder.server.authorities.request_rotation(immediate=True)
        new_signer = _ctx(holder).trust.keyring.signer.authority_id

        async def other_signs_with_the_new_authority() -> bool:
            return bool(_ctx(other).trust.keyring.signer.authority_id == new_signer)

        await wait_for(other_signs_with_the_new_authority, within=10, what="replica to follow")
        node_c = await enroll_node(other, "web-c")
        assert node_c.chain[1] == _ctx(holder).trust.keyring.signer.cert

        serial = format(node_b.cert.serial_number, "x")
        await b.revoke(serial)

        async def a_knows_the_revocation() -> bool:
            return serial in {r.serial for r in _ctx(a).trust.snapshot.revoked}

        await wait_for(a_knows_the_revocation, within=5, what="revocation on the other replica")


async def test_a_ban_or_entry_change_on_one_replica_reaches_the_other_s_cache(
    tmp_path: Path, postgres_server: object
) -> None:
    """Replica b caches who a node is and which entries it has; its clock is frozen, so
    nothing there expires by age. An entry deleted and a ban made through replica a still
    reach b's answers within its trust poll (0.2 s here), through the access version."""
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    async with two_replicas(tmp_path, url, clock_b=ManualClock()) as (a, b):
        node = await enroll_node(a, "web-1")
        kept = await a.create_entry("spiffe://example.org/svc/web", "web-1")
        dropped = await a.create_entry("spiffe://example.org/svc/old", "web-1")
        async with node_channel(b, node) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)

            async def listed() -> set[str]:
                answer = await stub.ListIdentities(
                    agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT
                )
                return {entry.id for entry in answer.entries}

            assert await listed() == {kept, dropped}  # now cached on b
            async with a.admin() as admin:
                await admin.DeleteEntry(admin_pb2.DeleteEntryRequest(id=dropped))

            async def b_forgot_the_entry() -> bool:
                return await listed() == {kept}

            await wait_for(b_forgot_the_entry, within=5, what="entry deletion on the other replica")

            await a.ban("web-1")

            async def b_refuses_the_node() -> bool:
                try:
                    await listed()
                except grpc.aio.AioRpcError as exc:
                    return bool(exc.code() == grpc.StatusCode.PERMISSION_DENIED)
                return False

            await wait_for(b_refuses_the_node, within=5, what="ban on the other replica")


async def test_pruning_runs_on_one_replica_at_a_time(
    tmp_path: Path, postgres_server: object
) -> None:
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    async with two_replicas(tmp_path, url) as (a, b):
        await a.create_join_token("web-1", ttl_seconds=60)
        leases = await asyncio.gather(
            _ctx(a).take_lease("prune", 600.0), _ctx(b).take_lease("prune", 600.0)
        )
        assert sorted(leases) == [False, True]
        # The holder prunes (again and again: idempotent); the other replica does nothing.
        holder = a if leases[0] else b
        other = b if holder is a else a
        assert await prune(_ctx(other), retention=0.0) == (0, 0)
        assert await prune(_ctx(holder), retention=30 * 86400.0) == (0, 0)


async def test_a_large_prune_is_done_in_short_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ca_server.services import pruning
    from tests.db.builders import T0, certificate

    monkeypatch.setattr(pruning, "PRUNE_CHUNK", 2)
    async with running_ca(tmp_path) as ca:
        ctx = _ctx(ca)
        expired = [certificate(not_after=T0 - 1000 + i) for i in range(5)]
        await ctx.writer.submit(lambda tx: tx.add_certificates(expired))
        batches = ctx.writer.batches
        assert await prune(ctx, retention=0.0) == (5, 0)
        # Three chunks of certificates (2 + 2 + 1), then tokens, lease and audit row.
        assert ctx.writer.batches - batches >= 4
        with ctx.store.read() as tx:
            assert all(tx.get_certificate(c.serial) is None for c in expired)
