"""Kubernetes node enrollment through the real CA (tests/support/ca.py: real gRPC listeners,
real TLS, real SQLite) whose attestor talks to a local STAND-IN for the Kubernetes API
server (tests/k8s/apiserver.py), since no real API server can run on these machines. The
stand-in answers TokenReview and pod reads over HTTPS with the documented shapes.

Shown here: a pod's projected token enrolls the node the pod runs on; every refusal has its
status code and a message that says what is wrong, and writes nothing to the database; a
new pod of the same node supersedes the previous node certificate at once; join tokens
keep working beside it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from meshtls.identity.x509 import spiffe_id_of
from meshtls.v1 import agent_pb2, agent_pb2_grpc
from tests.ca.helpers import (
    RPC_TIMEOUT,
    NodeIdentity,
    audit_for,
    db_state,
    der_chain,
    enroll_node,
    enrollment_channel,
    key_and_csr,
    key_pem,
    node_channel,
    rpc_error,
    store_of,
)
from tests.k8s.apiserver import StandInApiServer
from tests.k8s.conftest import kubernetes_config
from tests.support.ca import RunningCA, running_ca

NODE = "node-a"
NODE_ID = f"spiffe://example.org/meshtls/node/{NODE}"


@dataclass
class Cluster:
    api: StandInApiServer
    ca: RunningCA


@pytest.fixture
async def cluster(api: StandInApiServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_ca(tmp_path, kubernetes=kubernetes_config(api)) as ca:
        yield Cluster(api, ca)


async def enroll(ca: RunningCA, token: str, node: str = NODE) -> NodeIdentity:
    """Enroll over the real enrollment listener with a service-account token."""
    key, csr = key_and_csr()
    credential = agent_pb2.KubernetesCredential(service_account_token=token, node_name=node)
    async with enrollment_channel(ca) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        response = await stub.Enroll(
            agent_pb2.EnrollRequest(kubernetes=credential, csr=csr), timeout=RPC_TIMEOUT
        )
    assert response.node_name == node
    return NodeIdentity(node, key_pem(key), der_chain(response.node_certificate.certificates))


async def list_identities(ca: RunningCA, node: NodeIdentity) -> agent_pb2.ListIdentitiesResponse:
    async with node_channel(ca, node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        reply: agent_pb2.ListIdentitiesResponse = await stub.ListIdentities(
            agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT
        )
        return reply


async def test_pod_token_enrolls_the_node_the_pod_runs_on(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api, ca = cluster.api, cluster.ca
    pod = api.add_pod("meshtls-agent-x1", NODE)
    token = api.token_for(pod)
    node = await enroll(ca, token)

    assert str(spiffe_id_of(node.cert)) == NODE_ID
    await list_identities(ca, node)  # the certificate authenticates on the agent listener
    with store_of(ca).read() as tx:
        row = tx.get_node(NODE)
    assert row is not None
    assert row.current_serial == node.serial
    assert row.status == "active"
    (enrolled,) = [e for e in audit_for(ca, NODE) if e.action == "node.enroll"]
    assert enrolled.actor == "k8s:meshtls/meshtls-agent"
    assert enrolled.details["method"] == "k8s_psat"
    assert enrolled.details["serial"] == node.serial
    assert enrolled.details["pod"] == "meshtls/meshtls-agent-x1"
    assert enrolled.details["pod_uid"] == pod.uid
    assert enrolled.details["service_account"] == "meshtls/meshtls-agent"
    assert enrolled.details["previous_serial"] is None
    assert [r.path for r in api.requests] == [
        "/apis/authentication.k8s.io/v1/tokenreviews",
        "/api/v1/namespaces/meshtls/pods/meshtls-agent-x1",
    ]
    # The token is a credential: neither the audit trail nor any log line carries it.
    assert all(token not in str(e) for e in audit_for(ca, NODE))
    assert caplog.records
    assert all(token not in str(r.__dict__) for r in caplog.records)


@pytest.mark.parametrize(
    ("case", "code", "expected"),
    [
        ("forged token", "UNAUTHENTICATED", "did not authenticate the service-account token"),
        (
            "wrong audience",
            "UNAUTHENTICATED",
            'token audiences ["vault"] is invalid for the target audiences ["meshtls-ca"]',
        ),
        ("account not allowed", "PERMISSION_DENIED", "service account meshtls/default may not"),
        ("token bound to no pod", "UNAUTHENTICATED", "is not bound to a pod"),
        ("pod replaced meanwhile", "UNAUTHENTICATED", "(it was replaced)"),
        (
            "pod on another node",
            "PERMISSION_DENIED",
            "runs on node 'node-a', but the sidecar asked for the identity of node 'node-b'",
        ),
        ("pod not running", "PERMISSION_DENIED", "is Pending, not Running"),
        ("api server down", "UNAVAILABLE", "cannot reach the Kubernetes API server at {url}"),
    ],
)
async def test_refusals_say_why_and_write_nothing(
    cluster: Cluster, case: str, code: str, expected: str
) -> None:
    api, ca = cluster.api, cluster.ca
    pod = api.add_pod("meshtls-agent-x1", NODE)
    token, node = api.token_for(pod), NODE
    if case == "forged token":
        token = token[:-8] + "AAAAAAAA"
    elif case == "wrong audience":
        token = api.token_for(pod, audiences=("vault",))
    elif case == "account not allowed":
        token = api.token_for(api.add_pod("debug", NODE, service_account="default"))
    elif case == "token bound to no pod":
        token = api.unbound_token("meshtls", "meshtls-agent")
    elif case == "pod replaced meanwhile":
        # The pod is deleted and created anew under its name between review and read.
        api.after_review = lambda: api.recreate_pod(pod)
    elif case == "pod on another node":
        node = "node-b"
    elif case == "pod not running":
        token = api.token_for(api.add_pod("starting", NODE, phase="Pending"))
    else:
        await api.stop()
    before = db_state(ca)

    error = await rpc_error(enroll(ca, token, node))

    assert error.code().name == code
    assert expected.format(url=api.url) in (error.details() or "")
    assert token not in (error.details() or "")
    assert db_state(ca) == before


async def test_checks_before_asking_the_api_server(cluster: Cluster) -> None:
    api, ca = cluster.api, cluster.ca
    token = api.token_for(api.add_pod("meshtls-agent-x1", NODE))
    bad_name = await rpc_error(enroll(ca, token, "../node-a"))
    assert bad_name.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node_name: node name '../node-a'" in (bad_name.details() or "")
    no_name = await rpc_error(enroll(ca, token, ""))
    assert "node_name is required" in (no_name.details() or "")
    no_token = await rpc_error(enroll(ca, ""))
    assert no_token.code() == grpc.StatusCode.UNAUTHENTICATED
    assert api.requests == []


async def test_a_new_pod_of_the_node_supersedes_the_previous_certificate(
    cluster: Cluster,
) -> None:
    """A DaemonSet pod replaced on upgrade enrolls again; the old pod's certificate stops
    working at once (even though the CA had just cached it as valid)."""
    api, ca = cluster.api, cluster.ca
    old_pod = api.add_pod("meshtls-agent-x1", NODE)
    old = await enroll(ca, api.token_for(old_pod))
    await list_identities(ca, old)
    api.delete_pod(old_pod)
    new_pod = api.add_pod("meshtls-agent-y2", NODE)

    new = await enroll(ca, api.token_for(new_pod))

    refused = await rpc_error(list_identities(ca, old))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"(serial {old.serial}) was superseded" in (refused.details() or "")
    await list_identities(ca, new)
    with store_of(ca).read() as tx:
        row = tx.get_node(NODE)
    assert row is not None
    assert row.current_serial == new.serial
    assert row.pending_serial is None
    first, second = [e for e in audit_for(ca, NODE) if e.action == "node.enroll"][::-1]
    assert second.details["previous_serial"] == old.serial
    assert (first.details["pod"], second.details["pod"]) == (
        "meshtls/meshtls-agent-x1",
        "meshtls/meshtls-agent-y2",
    )


async def test_a_banned_node_cannot_come_back_with_a_pod_token(cluster: Cluster) -> None:
    api, ca = cluster.api, cluster.ca
    token = api.token_for(api.add_pod("meshtls-agent-x1", NODE))
    await enroll(ca, token)
    await ca.ban(NODE)
    before = db_state(ca)
    error = await rpc_error(enroll(ca, token))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"node {NODE} is banned" in (error.details() or "")
    assert db_state(ca) == before


async def test_join_tokens_keep_working_beside_kubernetes(cluster: Cluster) -> None:
    node = await enroll_node(cluster.ca, "vm-1")
    await list_identities(cluster.ca, node)
    (enrolled,) = [e for e in audit_for(cluster.ca, "vm-1") if e.action == "node.enroll"]
    assert enrolled.details["method"] == "join_token"
    assert enrolled.actor.startswith("token:sha256:")


async def test_a_ca_without_kubernetes_config_says_so(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        error = await rpc_error(enroll(ca, "eyJhbGciOiJSUzI1NiJ9.x.y"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Kubernetes enrollment is not enabled on this CA" in (error.details() or "")
