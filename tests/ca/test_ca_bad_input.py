"""Bad input on the agent API: each refusal carries the right status and leaves the
database exactly as it was; certificates the CA must not accept (revoked, expired, foreign,
none) are refused; and after all of it the CA still serves."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization

from meshtls.clock import ManualClock
from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import certs_to_pem
from meshtls.v1 import agent_pb2, agent_pb2_grpc
from tests.ca.helpers import (
    RPC_TIMEOUT,
    NodeIdentity,
    agent_channel,
    build_csr,
    db_state,
    der_chain,
    enroll_node,
    enroll_with,
    enrollment_channel,
    join_token,
    key_and_csr,
    key_pem,
    node_channel,
    rpc_error,
    sign_one,
)
from tests.support.ca import RunningCA, running_ca
from tests.support.pki import KeyKind, ThrowawayCA, make_key

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_BATCH = 4
MAX_MESSAGE = 64 * 1024


@dataclass
class Setup:
    ca: RunningCA
    node: NodeIdentity
    entries: list[str]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    async with running_ca(
        tmp_path_factory.mktemp("badinput"),
        max_csrs_per_batch=MAX_BATCH,
        max_message_bytes=MAX_MESSAGE,
    ) as ca:
        node = await enroll_node(ca, "bad-1")
        entries = [
            await ca.create_entry(f"spiffe://{ca.trust_domain}/svc/bad-{i}", "bad-1")
            for i in range(MAX_BATCH + 1)
        ]
        yield Setup(ca, node, entries)


def flipped_signature(csr_der: bytes) -> bytes:
    """A valid DER CSR with one byte of its signature changed: still parseable, no longer
    signed by the key it carries. The signature BIT STRING ends the DER encoding."""
    damaged = bytearray(csr_der)
    damaged[-1] ^= 0x01
    return bytes(damaged)


WEAK_KEYS: dict[str, KeyKind] = {"rsa1024": "rsa1024", "p192": "p192", "dsa": "dsa"}


def bad_csr(kind: str) -> bytes:
    if kind == "garbage":
        return b"\x30\x82 this is not a certificate request at all"
    if kind == "bad-signature":
        return flipped_signature(key_and_csr()[1])
    try:
        key = make_key(WEAK_KEYS[kind])
    except Exception as exc:  # an OpenSSL build without the weak algorithm
        pytest.skip(f"cryptography cannot make a {kind} key here: {exc}")
    return build_csr(key)


BAD_CSRS = {
    "garbage": "not a valid PKCS#10 request",
    "bad-signature": "signature does not verify",
    "rsa1024": "too weak",
    "p192": "curve",
    "dsa": "not allowed",
}


@pytest.mark.parametrize("kind", list(BAD_CSRS))
async def test_bad_csr_is_refused_everywhere_and_changes_nothing(setup: Setup, kind: str) -> None:
    ca, expected = setup.ca, BAD_CSRS[kind]
    csr = bad_csr(kind)
    token = await ca.create_join_token(f"bad-enroll-{kind}")
    before = db_state(ca)

    async with node_channel(ca, setup.node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        errors = {
            "Enroll": await rpc_error(enroll_with(ca, token, csr)),
            "RenewNode": await rpc_error(
                stub.RenewNode(agent_pb2.RenewNodeRequest(csr=csr), timeout=RPC_TIMEOUT)
            ),
            "SignIdentities": await rpc_error(sign_one(stub, setup.entries[0], csr)),
        }

    for method, error in errors.items():
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
        assert expected in (error.details() or ""), (method, error.details())
    assert db_state(ca) == before
    stored = join_token(ca, token)
    assert stored is not None
    assert stored.used_at is None, "a refused enrollment keeps its token"


async def _sign_batch(setup: Setup, requests: list[agent_pb2.IdentityCsr]) -> grpc.aio.AioRpcError:
    async with node_channel(setup.ca, setup.node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        return await rpc_error(
            stub.SignIdentities(
                agent_pb2.SignIdentitiesRequest(requests=requests), timeout=RPC_TIMEOUT
            )
        )


async def test_too_many_csrs_in_one_batch(setup: Setup) -> None:
    before = db_state(setup.ca)
    requests = [agent_pb2.IdentityCsr(entry_id=e, csr=key_and_csr()[1]) for e in setup.entries]
    assert len(requests) == MAX_BATCH + 1
    error = await _sign_batch(setup, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_BATCH}" in (error.details() or "")
    assert db_state(setup.ca) == before


async def test_duplicate_entry_in_one_batch(setup: Setup) -> None:
    before = db_state(setup.ca)
    entry = setup.entries[0]
    requests = [agent_pb2.IdentityCsr(entry_id=entry, csr=key_and_csr()[1]) for _ in range(2)]
    error = await _sign_batch(setup, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than once" in (error.details() or "")
    assert db_state(setup.ca) == before


async def test_empty_batch(setup: Setup) -> None:
    before = db_state(setup.ca)
    error = await _sign_batch(setup, [])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert db_state(setup.ca) == before


async def test_oversized_messages_are_refused_by_grpc(setup: Setup) -> None:
    ca = setup.ca
    huge = b"\x00" * (MAX_MESSAGE + 1024)
    token = await ca.create_join_token("bad-huge")
    before = db_state(ca)
    errors = [
        await rpc_error(enroll_with(ca, token, huge)),
        await _sign_batch(setup, [agent_pb2.IdentityCsr(entry_id=setup.entries[0], csr=huge)]),
    ]
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert db_state(ca) == before
    stored = join_token(ca, token)
    assert stored is not None
    assert stored.used_at is None


async def _renew_with(ca: RunningCA, key: bytes, chain: bytes) -> grpc.aio.AioRpcError:
    async with agent_channel(ca, key, chain) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        return await rpc_error(
            stub.RenewNode(agent_pb2.RenewNodeRequest(csr=key_and_csr()[1]), timeout=RPC_TIMEOUT)
        )


async def _list_identities(ca: RunningCA, node: NodeIdentity) -> None:
    async with node_channel(ca, node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        await stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT)


async def test_renewal_with_a_revoked_node_certificate(setup: Setup) -> None:
    """Refused at once, even right after the certificate was accepted (and any answer
    about it cached)."""
    ca = setup.ca
    node = await enroll_node(ca, "bad-revoked")
    await _list_identities(ca, node)
    await ca.revoke(node.serial, "key compromise")
    before = db_state(ca)
    error = await _renew_with(ca, node.key_pem, node.chain_pem)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (error.details() or "")
    assert db_state(ca) == before


async def test_renewal_with_a_superseded_node_certificate(setup: Setup) -> None:
    """Once a node has used its renewed certificate, the CA accepts only that one (the
    serial the nodes table tracks): the old one, copied or stolen, can no longer act. Until
    the first use, the old one still works, so a renewal answer lost on the way cannot lock
    the node out."""
    ca = setup.ca
    old = await enroll_node(ca, "bad-superseded")
    key, csr = key_and_csr()
    async with node_channel(ca, old) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        answer = await stub.RenewNode(agent_pb2.RenewNodeRequest(csr=csr), timeout=RPC_TIMEOUT)
        # The renewal answer may have been lost: the old certificate still works.
        await stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT)
    new = NodeIdentity(old.name, key_pem(key), der_chain(answer.node_certificate.certificates))
    async with node_channel(ca, new) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        await stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT)
    node = next(n for n in db_state(ca).nodes if n.name == old.name)
    assert node.current_serial == new.serial != old.serial
    before = db_state(ca)

    error = await _renew_with(ca, old.key_pem, old.chain_pem)

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert old.serial in (error.details() or "")
    assert "superseded" in (error.details() or "")
    assert db_state(ca) == before


async def test_renewal_with_an_expired_node_certificate(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """TLS refuses an expired client certificate during the handshake, before any call
    reaches the CA (gRPC Python cannot accept a connection and refuse it later), so the
    client sees UNAVAILABLE and nothing is written."""
    # A CA created three hours ago, so its intermediate can sign a certificate that was
    # valid from two hours ago to one hour ago.
    clock = ManualClock(time.time() - 3 * 3600)
    async with running_ca(tmp_path_factory.mktemp("expired"), clock=clock) as ca:
        node = await enroll_node(ca, "expired-1")
        assert ca.server is not None
        assert ca.server.ctx is not None
        signer = ca.server.ctx.trust.keyring.signer
        key = make_key()
        expired = signer.issue(
            key.public_key(),
            SpiffeId.for_node(ca.trust_domain, node.name),
            ttl_seconds=3600,
            now=time.time() - 2 * 3600,
        )
        assert expired.not_valid_after_utc.timestamp() < time.time()
        # Control: the node's valid certificate renews on this very CA.
        async with node_channel(ca, node) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            await stub.RenewNode(
                agent_pb2.RenewNodeRequest(csr=key_and_csr()[1]), timeout=RPC_TIMEOUT
            )
        before = db_state(ca)

        error = await _renew_with(ca, key_pem(key), certs_to_pem([expired, *signer.chain]))

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert db_state(ca) == before


async def test_renewal_with_a_certificate_from_a_foreign_ca(setup: Setup) -> None:
    """A certificate from another CA (even one naming our node's SPIFFE ID) fails the TLS
    handshake before any call reaches the CA: UNAVAILABLE, nothing written."""
    ca = setup.ca
    foreign = ThrowawayCA.root(common_name="meshtls root CA", trust_domain=ca.trust_domain)
    leaf = foreign.leaf(str(SpiffeId.for_node(ca.trust_domain, setup.node.name)))
    before = db_state(ca)
    error = await _renew_with(ca, leaf.key_pem, leaf.cert.public_bytes(serialization.Encoding.PEM))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert db_state(ca) == before


NEEDS_NODE_CERT: dict[str, Callable[[agent_pb2_grpc.AgentServiceStub], Awaitable[object]]] = {
    "RenewNode": lambda stub: stub.RenewNode(
        agent_pb2.RenewNodeRequest(csr=key_and_csr()[1]), timeout=RPC_TIMEOUT
    ),
    "ListIdentities": lambda stub: stub.ListIdentities(
        agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT
    ),
    "SignIdentities": lambda stub: sign_one(stub, "0" * 32, key_and_csr()[1]),
}


@pytest.mark.parametrize("method", list(NEEDS_NODE_CERT))
async def test_node_calls_without_a_client_certificate(setup: Setup, method: str) -> None:
    ca = setup.ca
    before = db_state(ca)
    async with enrollment_channel(ca) as channel:
        error = await rpc_error(NEEDS_NODE_CERT[method](agent_pb2_grpc.AgentServiceStub(channel)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "agent listener" in (error.details() or "")
    assert db_state(ca) == before


async def test_the_ca_still_serves_after_all_that(setup: Setup) -> None:
    ca = setup.ca
    node = await enroll_node(ca, "bad-survivor")
    entry = await ca.create_entry(f"spiffe://{ca.trust_domain}/svc/survivor", "bad-survivor")
    async with node_channel(ca, node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        signed = await sign_one(stub, entry, key_and_csr()[1])
        renewed = await stub.RenewNode(
            agent_pb2.RenewNodeRequest(csr=key_and_csr()[1]), timeout=RPC_TIMEOUT
        )
    assert signed.identities[0].spiffe_id.endswith("/svc/survivor")
    assert len(renewed.node_certificate.certificates) == 2
    # The original node, which sent every bad request above, still works too.
    async with node_channel(ca, setup.node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        listed = await stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT)
    assert sorted(e.id for e in listed.entries) == sorted(setup.entries)
