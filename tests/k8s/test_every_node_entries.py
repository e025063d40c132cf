"""Registration entries for every node (`--node '*'`) on the real CA (tests/support/ca.py):
a node lists and signs its own entries plus the `*` ones, whether it enrolled with a
service-account token (through the attestor and the local STAND-IN for the Kubernetes API
server, tests/k8s/apiserver.py, since no real API server runs here) or a join token. A
change to a `*` entry reaches every node at once (the per-node entry caches are not in the
way)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from meshtls.identity.x509 import serial_hex, spiffe_id_of
from meshtls.v1 import admin_pb2, agent_pb2, agent_pb2_grpc
from tests.ca.helpers import (
    RPC_TIMEOUT,
    NodeIdentity,
    certificate,
    der_chain,
    enroll_node,
    key_and_csr,
    node_channel,
    rpc_error,
    run_cli,
    sign_one,
)
from tests.k8s.apiserver import StandInApiServer
from tests.k8s.conftest import kubernetes_config
from tests.k8s.test_enrollment import enroll
from tests.support.ca import RunningCA, running_ca

EVERYWHERE = "spiffe://example.org/svc/log-shipper"
LATER = "spiffe://example.org/svc/metrics-agent"
ONLY_A = "spiffe://example.org/svc/web"
ONLY_B = "spiffe://example.org/svc/db"


async def listed(ca: RunningCA, node: NodeIdentity) -> dict[str, str]:
    """SPIFFE ID -> entry id of what the node is told to obtain."""
    async with node_channel(ca, node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        reply = await stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT)
    return {e.spiffe_id: e.id for e in reply.entries}


async def test_star_entries_are_served_to_every_node(api: StandInApiServer, tmp_path: Path) -> None:
    async with running_ca(tmp_path, kubernetes=kubernetes_config(api)) as ca:
        # The documented command, through the real CLI and the admin socket.
        created = await run_cli(
            "entry", "create", "--spiffe-id", EVERYWHERE, "--node", "*", "--data-dir", ca.data_dir
        )
        assert created.returncode == 0, created.stderr
        assert EVERYWHERE in created.stdout
        await ca.create_entry(ONLY_A, "node-a")
        await ca.create_entry(ONLY_B, "node-b")
        node_a = await enroll(ca, api.token_for(api.add_pod("meshtls-agent-x1", "node-a")))
        node_b = await enroll_node(ca, "node-b")  # a join token: `*` is for every node

        for_a, for_b = await listed(ca, node_a), await listed(ca, node_b)
        assert set(for_a) == {EVERYWHERE, ONLY_A}
        assert set(for_b) == {EVERYWHERE, ONLY_B}
        assert for_a[EVERYWHERE] == for_b[EVERYWHERE]

        # Each node obtains the shared identity; its certificate is recorded to that node.
        for node in (node_a, node_b):
            async with node_channel(ca, node) as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                reply = await sign_one(stub, for_a[EVERYWHERE], key_and_csr()[1])
            leaf = der_chain(reply.identities[0].certificate.certificates)[0]
            assert str(spiffe_id_of(leaf)) == EVERYWHERE
            record = certificate(ca, serial_hex(leaf))
            assert record is not None
            assert record.node_name == node.name

        # A node still cannot obtain another node's own entry.
        async with node_channel(ca, node_b) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            refused = await rpc_error(sign_one(stub, for_a[ONLY_A], key_and_csr()[1]))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED

        # Both lists are cached now; a new `*` entry and a deletion show at once anyway.
        later = await ca.create_entry(LATER, "*")
        assert set(await listed(ca, node_a)) == {EVERYWHERE, LATER, ONLY_A}
        assert set(await listed(ca, node_b)) == {EVERYWHERE, LATER, ONLY_B}
        async with ca.admin() as admin:
            await admin.DeleteEntry(admin_pb2.DeleteEntryRequest(id=later))
        assert set(await listed(ca, node_a)) == {EVERYWHERE, ONLY_A}
        assert set(await listed(ca, node_b)) == {EVERYWHERE, ONLY_B}


@pytest.mark.parametrize("name", ["*x", "node-*", "**"])
async def test_only_a_lone_star_means_every_node(tmp_path: Path, name: str) -> None:
    async with running_ca(tmp_path) as ca:
        error = await rpc_error(ca.create_entry(EVERYWHERE, name))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"node name {name!r}" in (error.details() or "")
