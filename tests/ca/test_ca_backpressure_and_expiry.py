"""Back-pressure: past its signing rate a replica answers RESOURCE_EXHAUSTED with a
retry-after hint (and signs nothing), instead of timing out. Expiry warnings name what is
about to expire and what to do."""

from __future__ import annotations

from pathlib import Path

import grpc

from ca_server.domain import Authority, AuthorityKind, AuthorityState
from ca_server.services.jobs import expiry_warnings
from meshtls.v1 import agent_pb2, agent_pb2_grpc
from tests.ca.helpers import enroll_node, key_and_csr, node_channel, rpc_error
from tests.support.ca import running_ca

DAY = 86400.0


async def test_signing_past_the_replica_limit_is_refused_with_a_retry_hint(tmp_path: Path) -> None:
    async with running_ca(tmp_path, signing_rate_limit=2.0) as ca:
        entries = [await ca.create_entry(f"spiffe://example.org/w/{i}", "web-1") for i in range(5)]
        node = await enroll_node(ca, "web-1")  # takes one of the 4 burst signatures
        async with node_channel(ca, node) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            request = agent_pb2.SignIdentitiesRequest(
                requests=[agent_pb2.IdentityCsr(entry_id=e, csr=key_and_csr()[1]) for e in entries]
            )
            error = await rpc_error(stub.SignIdentities(request))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "signing on this CA replica" in (error.details() or "")
        hints = dict(error.trailing_metadata() or ())
        assert float(hints["retry-after"]) > 0
        assert ca.server is not None
        assert ca.server.ctx is not None
        with ca.server.ctx.store.read() as tx:
            kinds = {r.kind for r in tx.list_certificates(node_name="web-1", limit=100)}
        assert kinds == {"node"}  # nothing of the refused batch was signed or recorded


def _authority(
    kind: AuthorityKind,
    state: AuthorityState,
    not_before: float,
    not_after: float,
    *,
    upstream: bool,
) -> Authority:
    return Authority(
        id=f"{kind}-{state}",
        kind=kind,
        state=state,
        parent_id=None,
        cert_pem="",
        encrypted_key=None,
        upstream=upstream,
        fingerprint_sha256="",
        subject="",
        not_before=not_before,
        not_after=not_after,
        created_at=not_before,
    )


def test_expiry_warnings_name_the_authority_and_the_fix() -> None:
    now = 1_000 * DAY
    upstream = _authority("intermediate", "active", now - 300 * DAY, now + 10 * DAY, upstream=True)
    assert expiry_warnings([upstream], now, 30 * DAY) == [
        f"upstream intermediate {upstream.id} expires in 10.0 days "
        "(1972-10-07 00:00 UTC): install a new one from your CA "
        "(upstream: cert_file/key_file/chain_file)"
    ]
    assert expiry_warnings([upstream], now, 5 * DAY) == []
    stale = _authority("intermediate", "active", now - 29 * DAY, now + DAY, upstream=False)
    assert "has not been rotated" in expiry_warnings([stale], now, 30 * DAY)[0]
    fresh = _authority("intermediate", "active", now - DAY, now + 29 * DAY, upstream=False)
    assert expiry_warnings([fresh], now, 30 * DAY) == []
    gone = _authority("root", "active", now - 30 * DAY, now - 1, upstream=False)
    assert "EXPIRED" in expiry_warnings([gone], now, 30 * DAY)[0]
    retired = _authority("root", "retired", now - 30 * DAY, now - 1, upstream=False)
    assert expiry_warnings([retired], now, 30 * DAY) == []
