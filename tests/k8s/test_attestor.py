"""The Kubernetes attestor (ca_server/attestation/) against a local STAND-IN for the
Kubernetes API server (tests/k8s/apiserver.py): no real API server can run on these
machines. The stand-in speaks HTTPS with a throwaway CA and answers TokenReview and pod
reads with the request/response shapes the Kubernetes API documents. These tests check
what the attestor sends (bearer auth with the CA's own token, the audience) and how it
handles the API server failing: down, hanging, refusing the CA's token or its RBAC, or
presenting a certificate the CA file does not vouch for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from ca_server.attestation import Attestation
from ca_server.attestation.k8s import KubernetesAttestor
from ca_server.errors import ConfigError, Unavailable
from tests.k8s.apiserver import StandInApiServer
from tests.k8s.conftest import kubernetes_config
from tests.support.pki import ThrowawayCA


@asynccontextmanager
async def attestor(
    api: StandInApiServer, *, deadline: float = 4.0, **config: Any
) -> AsyncIterator[KubernetesAttestor]:
    made = KubernetesAttestor.from_config(kubernetes_config(api, **config), timeout=deadline)
    try:
        yield made
    finally:
        await made.close()


async def test_attests_the_pod_with_the_documented_requests(api: StandInApiServer) -> None:
    pod = api.add_pod("meshtls-agent-x1", "node-a")
    token = api.token_for(pod)
    async with attestor(api) as kubernetes:
        attestation = await kubernetes.attest(token, "node-a")
    assert attestation == Attestation(
        node_name="node-a",
        method="k8s_psat",
        actor="k8s:meshtls/meshtls-agent",
        details={
            "pod": "meshtls/meshtls-agent-x1",
            "pod_uid": pod.uid,
            "service_account": "meshtls/meshtls-agent",
        },
    )
    review, read = api.requests
    assert (review.method, review.path) == ("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
    assert review.headers["authorization"] == f"Bearer {api.ca_token}"
    assert review.headers["content-type"] == "application/json"
    assert review.body == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": ["meshtls-ca"]},
    }
    assert (read.method, read.path) == ("GET", "/api/v1/namespaces/meshtls/pods/meshtls-agent-x1")
    assert read.headers["authorization"] == f"Bearer {api.ca_token}"
    assert read.body is None


async def test_rereads_its_own_token_at_every_call(api: StandInApiServer) -> None:
    """The kubelet rotates the CA's token file; the next call must use the new token."""
    pod = api.add_pod("meshtls-agent-x1", "node-a")
    async with attestor(api) as kubernetes:
        await kubernetes.attest(api.token_for(pod), "node-a")
        api.ca_token = "rotated-" + api.ca_token
        api.token_file.write_text(api.ca_token)
        await kubernetes.attest(api.token_for(pod), "node-a")
        assert api.requests[-1].headers["authorization"] == f"Bearer {api.ca_token}"
        api.token_file.unlink()
        with pytest.raises(Unavailable, match="cannot read the CA's own service-account token"):
            await kubernetes.attest(api.token_for(pod), "node-a")


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("down", "cannot reach the Kubernetes API server at {url} "),
        ("hang", "the Kubernetes API server at {url} did not answer within 0.3s"),
        ("ca token rejected", "did not accept the CA's own service-account token"),
        ("tokenreviews forbidden", 'cannot create resource "tokenreviews"'),
        ("pods forbidden", "does not allow the CA to get pods in namespace meshtls (HTTP 403)"),
        ("foreign certificate", "does not verify against kubernetes.ca_file"),
    ],
)
async def test_api_server_failures_are_unavailable_and_name_the_server(
    api: StandInApiServer, tmp_path: Any, failure: str, expected: str
) -> None:
    pod = api.add_pod("meshtls-agent-x1", "node-a")
    token = api.token_for(pod)
    config: dict[str, Any] = {}
    if failure == "down":
        await api.stop()
    elif failure == "hang":
        api.hang = True
    elif failure == "ca token rejected":
        api.ca_token = "the API server no longer accepts the mounted one"
    elif failure == "tokenreviews forbidden":
        api.forbidden.add("tokenreviews")
    elif failure == "pods forbidden":
        api.forbidden.add("pods")
    else:
        other = tmp_path / "other-ca.crt"
        other.write_bytes(ThrowawayCA.root(common_name="another cluster").cert_pem)
        config["ca_file"] = other
    async with attestor(api, deadline=0.3, **config) as kubernetes:
        with pytest.raises(Unavailable) as refused:
            await kubernetes.attest(token, "node-a")
    message = refused.value.message
    assert expected.format(url=api.url) in message
    assert api.url in message
    assert token not in message
    assert api.ca_token not in message


async def test_unusable_files_fail_at_startup(api: StandInApiServer) -> None:
    missing = api.ca_file.with_name("absent.crt")
    with pytest.raises(ConfigError, match=r"kubernetes.ca_file: .*absent.crt does not exist"):
        KubernetesAttestor.from_config(kubernetes_config(api, ca_file=missing))
    api.token_file.unlink()
    with pytest.raises(ConfigError, match=r"\(kubernetes.token_file\)"):
        KubernetesAttestor.from_config(kubernetes_config(api))
