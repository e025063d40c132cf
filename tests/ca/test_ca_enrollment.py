"""Enrollment over the real enrollment listener: a join token buys exactly one node
certificate; unknown, used and expired tokens are refused with a message that says which,
and a refused enrollment leaves the database exactly as it was."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from meshtls.clock import ManualClock
from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import certs_to_pem
from meshtls.identity.profile import profile_problems
from meshtls.v1 import agent_pb2, agent_pb2_grpc
from tests.ca.helpers import (
    RPC_TIMEOUT,
    db_state,
    der_chain,
    enroll_with,
    enrollment_channel,
    join_token,
    key_and_csr,
    rpc_error,
)
from tests.support.ca import RunningCA, running_ca

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ca(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningCA]:
    async with running_ca(tmp_path_factory.mktemp("enroll")) as running:
        yield running


async def test_enrollment_issues_the_node_certificate_and_records_it(ca: RunningCA) -> None:
    token = await ca.create_join_token("web-1")
    key, csr = key_and_csr()
    response = await enroll_with(ca, token, csr)

    expected_id = str(SpiffeId.for_node(ca.trust_domain, "web-1"))
    assert response.node_name == "web-1"
    assert response.spiffe_id == expected_id
    chain = der_chain(response.node_certificate.certificates)
    assert len(chain) == 2, "leaf then intermediate, never the root"
    leaf, intermediate = chain
    assert leaf.public_key() == key.public_key()
    assert profile_problems(leaf, intermediate) == []
    assert response.bundle.trust_domain == ca.trust_domain
    assert certs_to_pem(der_chain(response.bundle.root_certificates)) == ca.bundle_pem

    state = db_state(ca)
    node = next(n for n in state.nodes if n.name == "web-1")
    serial = format(leaf.serial_number, "x")
    assert node.status == "active"
    assert node.current_serial == serial
    record = next(c for c in state.certificates if c.serial == serial)
    assert (record.kind, record.node_name, record.spiffe_id) == ("node", "web-1", expected_id)
    used = join_token(ca, token)
    assert used is not None
    assert used.used_at is not None
    actions = {(e.action, e.subject) for e in state.audit}
    assert ("token.use", "web-1") in actions
    assert ("certificate.issue", serial) in actions
    assert not any(token in repr(e.details) or token in e.actor for e in state.audit), (
        "the join token itself must never reach the audit trail"
    )


async def _race(ca: RunningCA, token: str) -> list[object]:
    """Two enrollments with one token, each on its own channel, sent at the same time."""
    channels = [enrollment_channel(ca), enrollment_channel(ca)]
    try:
        for channel in channels:
            await channel.channel_ready()
        calls = [
            agent_pb2_grpc.AgentServiceStub(channel).Enroll(
                agent_pb2.EnrollRequest(join_token=token, csr=key_and_csr()[1]),
                timeout=RPC_TIMEOUT,
            )
            for channel in channels
        ]
        return list(await asyncio.gather(*calls, return_exceptions=True))
    finally:
        for channel in channels:
            await channel.close()


async def test_one_token_two_concurrent_enrollments_exactly_one_wins(
    tmp_path: Path, database_url: str
) -> None:
    async with running_ca(tmp_path, database_url=database_url) as ca:
        for round_number in range(3):
            node = f"race-{round_number}"
            token = await ca.create_join_token(node)
            before = db_state(ca)

            results = await _race(ca, token)

            won = [r for r in results if isinstance(r, agent_pb2.EnrollResponse)]
            lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(won) == 1, results
            assert len(lost) == 1, results
            assert lost[0].code() == grpc.StatusCode.UNAUTHENTICATED
            assert "already used" in (lost[0].details() or "")
            after = db_state(ca)
            issued = [c for c in after.certificates if c.node_name == node]
            assert len(issued) == 1, "the losing enrollment must leave no certificate row"
            leaf = der_chain(won[0].node_certificate.certificates)[0]
            assert issued[0].serial == format(leaf.serial_number, "x")
            assert len(after.certificates) == len(before.certificates) + 1
            uses = [e for e in after.audit if e.action == "token.use" and e.subject == node]
            assert len(uses) == 1


async def test_unknown_token_is_refused_and_changes_nothing(ca: RunningCA) -> None:
    before = db_state(ca)
    _, csr = key_and_csr()
    error = await rpc_error(enroll_with(ca, "mjt_" + secrets.token_urlsafe(32), csr))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not known" in (error.details() or "")
    assert db_state(ca) == before


async def test_missing_token_is_refused_and_changes_nothing(ca: RunningCA) -> None:
    before = db_state(ca)
    _, csr = key_and_csr()
    error = await rpc_error(enroll_with(ca, "", csr))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "join token is required" in (error.details() or "")
    assert db_state(ca) == before


async def test_used_token_is_refused_and_changes_nothing(ca: RunningCA) -> None:
    token = await ca.create_join_token("reuse-1")
    _, csr = key_and_csr()
    await enroll_with(ca, token, csr)
    before = db_state(ca)

    _, other_csr = key_and_csr()
    error = await rpc_error(enroll_with(ca, token, other_csr))

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (error.details() or "")
    assert db_state(ca) == before


async def test_expired_token_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    # Only the CA's clock moves, and only before the refused call: no certificate issued
    # after the jump is needed for TLS (the CA's server certificate predates it).
    clock = ManualClock()
    async with running_ca(tmp_path, clock=clock) as ca:
        token = await ca.create_join_token("late-1", ttl_seconds=60)
        await clock.advance(61)
        before = db_state(ca)

        _, csr = key_and_csr()
        error = await rpc_error(enroll_with(ca, token, csr))

        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired at" in (error.details() or "")
        assert db_state(ca) == before
        stored = join_token(ca, token)
        assert stored is not None
        assert stored.used_at is None
