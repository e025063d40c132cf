"""A real sidecar (SidecarApp) enrolling on Kubernetes with its pod's projected
service-account token, against the real CA (tests/support/ca.py) whose attestor asks a
local STAND-IN for the Kubernetes API server (tests/k8s/apiserver.py), because no real API
server can run on these machines; the stand-in answers TokenReview and pod reads with the
documented shapes over HTTPS.

The node name comes from MESHTLS_NODE_NAME as a DaemonSet's fieldRef would set it. The CA
runs on real time; the sidecar's clock is a ManualClock, advanced to pass its backoff."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshtls.clock import ManualClock
from sidecar.app import SidecarApp
from sidecar.config import SidecarConfig, load_config
from tests.k8s.apiserver import Pod, StandInApiServer
from tests.k8s.conftest import kubernetes_config
from tests.sidecar.helpers import sidecar_document, wait_for, write_config
from tests.support.ca import RunningCA, running_ca

NODE = "node-a"
EVERYWHERE = "spiffe://example.org/svc/log-shipper"
ONLY_HERE = "spiffe://example.org/svc/web"
ELSEWHERE = "spiffe://example.org/svc/db"


@dataclass
class Cluster:
    tmp_path: Path
    api: StandInApiServer
    ca: RunningCA
    pod: Pod
    token_file: Path  # where the kubelet projects the agent pod's token

    def config(self, node_env: str = NODE) -> SidecarConfig:
        bundle = self.tmp_path / "bundle.pem"
        bundle.write_bytes(self.ca.bundle_pem)
        document = sidecar_document(
            self.tmp_path,
            agent_address=self.ca.agent_address,
            enroll_address=self.ca.enroll_address,
            bundle_path=bundle,
            kubernetes_token_file=str(self.token_file),
        )
        del document["node"]  # a DaemonSet's ConfigMap cannot name the node
        path = write_config(self.tmp_path / "sidecar.yaml", document)
        return load_config(path, env={"MESHTLS_NODE_NAME": node_env})


@pytest.fixture
async def cluster(api: StandInApiServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_ca(tmp_path, kubernetes=kubernetes_config(api)) as ca:
        pod = api.add_pod("meshtls-agent-x1", NODE)
        token_file = tmp_path / "tokens" / "meshtls-ca"
        token_file.parent.mkdir()
        token_file.write_text(api.token_for(pod))
        await ca.create_entry(ONLY_HERE, NODE)
        await ca.create_entry(ELSEWHERE, "node-b")
        yield Cluster(tmp_path, api, ca, pod, token_file)


@asynccontextmanager
async def sidecar(config: SidecarConfig, clock: ManualClock) -> AsyncIterator[SidecarApp]:
    app = SidecarApp(config, clock=clock)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def ready(app: SidecarApp) -> bool:
    return app.manager.readiness()[0]


def held(app: SidecarApp) -> set[str]:
    return {str(i.entry.spiffe_id) for i in app.manager.snapshot().identities.values()}


def enroll_failures(app: SidecarApp, reason: str) -> int:
    return app.manager.health.failures[("enroll", reason)]


def advancer(clock: ManualClock, seconds: float) -> Callable[[], Awaitable[None]]:
    async def tick() -> None:
        await clock.advance(seconds)

    return tick


async def test_sidecar_enrolls_with_its_pod_token_and_gets_every_node_entries(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await cluster.ca.create_entry(EVERYWHERE, "*")
    async with sidecar(cluster.config(), ManualClock()) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        snap = app.manager.snapshot()
        assert snap.node is not None
        assert str(snap.node.svid.spiffe_id) == f"spiffe://example.org/meshtls/node/{NODE}"
        assert held(app) == {EVERYWHERE, ONLY_HERE}
    (review,) = cluster.api.reviews()
    token = cluster.token_file.read_text()
    assert review.body["spec"] == {"token": token, "audiences": ["meshtls-ca"]}
    assert all(token not in str(r.__dict__) for r in caplog.records)


async def test_sidecar_backs_off_while_the_api_server_is_down_and_then_enrolls(
    cluster: Cluster,
) -> None:
    api = cluster.api
    await api.stop()
    clock = ManualClock()
    async with sidecar(cluster.config(), clock) as app:
        await wait_for(lambda: enroll_failures(app, "unavailable") >= 1, what="a failed try")
        error = app.manager.health.last_error
        assert error is not None
        assert f"cannot reach the Kubernetes API server at {api.url}" in error.message
        # It waits for its backoff (on its own clock) before trying again.
        assert app.manager.retry_at > clock.now()
        assert enroll_failures(app, "unavailable") == 1
        await wait_for(
            lambda: enroll_failures(app, "unavailable") >= 2,
            tick=advancer(clock, 0.5),
            what="a second try after the backoff",
        )
        assert not ready(app)
        # Meanwhile the kubelet rotated the projected token: the old one is no longer valid.
        old = cluster.token_file.read_text()
        del api.tokens[old]
        cluster.token_file.write_text(api.token_for(cluster.pod))
        await api.start()
        await wait_for(lambda: ready(app), tick=advancer(clock, 0.5), what="enrolled")
        assert held(app) == {ONLY_HERE}
    assert api.reviews()[-1].body["spec"]["token"] == cluster.token_file.read_text()


async def test_a_refused_sidecar_says_why_and_keeps_trying_its_token(cluster: Cluster) -> None:
    """Unlike a join token, a refused service-account token is sent again after the
    backoff: the cause (here the node name) may be fixed without a new token."""
    clock = ManualClock()
    async with sidecar(cluster.config(node_env="node-b"), clock) as app:
        await wait_for(lambda: enroll_failures(app, "permission_denied") >= 1, what="refusal")
        problem = app.manager.problem()
        assert problem is not None
        assert "the CA refused the service-account token from" in problem
        assert "runs on node 'node-a', but the sidecar asked for the identity of node" in problem
        await wait_for(
            lambda: enroll_failures(app, "permission_denied") >= 2,
            tick=advancer(clock, 1.0),
            what="a second try with the same token",
        )
        assert not ready(app)
    assert len(cluster.api.reviews()) >= 2
