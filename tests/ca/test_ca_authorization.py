"""Authorization on the agent listener: the CA decides identities from the authenticated
caller, never from the CSR. A node gets only the entries registered to it, a CSR's names
are ignored, and a banned node is refused everything."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from cryptography import x509

from meshtls.identity.ids import SpiffeId
from meshtls.identity.x509 import spiffe_id_of
from meshtls.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, types_pb2
from tests.ca.helpers import (
    RPC_TIMEOUT,
    build_csr,
    db_state,
    der_chain,
    enroll_node,
    enroll_with,
    join_token,
    key_and_csr,
    node_channel,
    rpc_error,
    sign_one,
)
from tests.support.ca import RunningCA, running_ca
from tests.support.pki import PrivateKey, make_key

pytestmark = pytest.mark.asyncio(loop_scope="module")

TD = "example.org"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ca(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningCA]:
    async with running_ca(tmp_path_factory.mktemp("authz"), trust_domain=TD) as running:
        yield running


def sans(cert: x509.Certificate) -> tuple[list[str], list[str], int]:
    """(URI SANs, DNS SANs, number of SAN entries of any type)."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    dns = san.get_values_for_type(x509.DNSName)
    return list(uris), list(dns), len(list(san))


async def test_a_node_cannot_obtain_another_nodes_identity(ca: RunningCA) -> None:
    web = await enroll_node(ca, "authz-web")
    await enroll_node(ca, "authz-db")
    own = await ca.create_entry(f"spiffe://{TD}/svc/authz-web", "authz-web")
    foreign = await ca.create_entry(f"spiffe://{TD}/svc/authz-db", "authz-db")
    before = db_state(ca)

    async with node_channel(ca, web) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        alone = await rpc_error(sign_one(stub, foreign, key_and_csr()[1]))
        mixed = await rpc_error(
            stub.SignIdentities(
                agent_pb2.SignIdentitiesRequest(
                    requests=[
                        agent_pb2.IdentityCsr(entry_id=own, csr=key_and_csr()[1]),
                        agent_pb2.IdentityCsr(entry_id=foreign, csr=key_and_csr()[1]),
                    ]
                ),
                timeout=RPC_TIMEOUT,
            )
        )
        listed = await stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT)

    for error in (alone, mixed):
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert foreign in (error.details() or "")
        assert "not registered to node authz-web" in (error.details() or "")
    assert db_state(ca) == before, "a refused batch signs nothing, not even the node's own entry"
    assert [e.id for e in listed.entries] == [own], "a node lists only its own entries"


async def test_unknown_entry_id_is_refused_like_a_foreign_one(ca: RunningCA) -> None:
    node = await enroll_node(ca, "authz-ghost")
    before = db_state(ca)
    async with node_channel(ca, node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        error = await rpc_error(sign_one(stub, "0" * 32, key_and_csr()[1]))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert db_state(ca) == before


def greedy_csr(key: PrivateKey) -> bytes:
    """A CSR asking for an admin identity, another node's identity and foreign DNS names."""
    return build_csr(
        key,
        uris=[f"spiffe://{TD}/svc/admin", f"spiffe://{TD}/meshtls/node/authz-other"],
        dns_names=["evil.com", "names.internal.evil.com"],
        common_name="admin",
    )


async def test_csr_names_are_ignored_the_entry_decides(ca: RunningCA) -> None:
    node = await enroll_node(ca, "authz-names")
    entry_id = await ca.create_entry(
        f"spiffe://{TD}/svc/names", "authz-names", dns_names=["names.internal"]
    )
    key = make_key()
    async with node_channel(ca, node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        signed = await sign_one(stub, entry_id, greedy_csr(key))
        renew_key = make_key()
        renewed = await stub.RenewNode(
            agent_pb2.RenewNodeRequest(csr=greedy_csr(renew_key)),
            timeout=RPC_TIMEOUT,
        )
    token = await ca.create_join_token("authz-names-2")
    enroll_key = make_key()
    enrolled = await enroll_with(ca, token, greedy_csr(enroll_key))

    leaf = der_chain(signed.identities[0].certificate.certificates)[0]
    assert signed.identities[0].spiffe_id == f"spiffe://{TD}/svc/names"
    assert sans(leaf) == ([f"spiffe://{TD}/svc/names"], ["names.internal"], 2)
    assert leaf.public_key() == key.public_key()
    assert leaf.subject.rfc4514_string() != "CN=admin"

    node_cert = der_chain(renewed.node_certificate.certificates)[0]
    assert sans(node_cert) == ([f"spiffe://{TD}/meshtls/node/authz-names"], [], 1)
    assert node_cert.public_key() == renew_key.public_key()

    enrolled_cert = der_chain(enrolled.node_certificate.certificates)[0]
    assert spiffe_id_of(enrolled_cert) == SpiffeId.for_node(TD, "authz-names-2")
    assert sans(enrolled_cert) == ([f"spiffe://{TD}/meshtls/node/authz-names-2"], [], 1)


async def test_a_banned_node_is_refused_everything(ca: RunningCA) -> None:
    node = await enroll_node(ca, "authz-banned")
    entry_id = await ca.create_entry(f"spiffe://{TD}/svc/banned", "authz-banned")
    async with node_channel(ca, node) as channel:  # accepted (and cached) just before the ban
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        await stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT)
    await ca.ban("authz-banned")
    before = db_state(ca)
    assert next(n for n in before.nodes if n.name == "authz-banned").status == "banned"

    async with node_channel(ca, node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        errors = [
            await rpc_error(
                stub.RenewNode(
                    agent_pb2.RenewNodeRequest(csr=key_and_csr()[1]), timeout=RPC_TIMEOUT
                )
            ),
            await rpc_error(
                stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT)
            ),
            await rpc_error(sign_one(stub, entry_id, key_and_csr()[1])),
        ]
        watch = stub.Watch(agent_pb2.WatchRequest(), timeout=RPC_TIMEOUT)
        errors.append(await rpc_error(watch.read()))
    for error in errors:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        assert "authz-banned is banned" in (error.details() or "")

    # A new join token does not bring a banned node back, and is not consumed.
    token = await ca.create_join_token("authz-banned")
    before = db_state(ca)
    error = await rpc_error(enroll_with(ca, token, key_and_csr()[1]))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert db_state(ca) == before
    stored = join_token(ca, token)
    assert stored is not None
    assert stored.used_at is None


async def test_admin_api_on_agent_listener_is_off_without_admin_ids(ca: RunningCA) -> None:
    node = await enroll_node(ca, "authz-admin")
    async with node_channel(ca, node) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        errors = [
            await rpc_error(admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT)),
            await rpc_error(
                admin.GetTrustBundle(types_pb2.GetTrustBundleRequest(), timeout=RPC_TIMEOUT)
            ),
            await rpc_error(
                admin.CreateJoinToken(
                    admin_pb2.CreateJoinTokenRequest(node_name="sneaky"), timeout=RPC_TIMEOUT
                )
            ),
        ]
    for error in errors:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin_spiffe_ids" in (error.details() or "")
