"""The chart and the command lines agree: the CA and the agent are started from what the
chart renders (each container's command + args, its environment and its mounted config
files, paths mapped into a temporary root by tests/helm/pods.py) against the real CLIs, and
the operator's steps are the ones NOTES.txt prints. The CA comes up (its rendered probes
answer), the agent enrolls through the Kubernetes attestor with its projected token, and
the probes of both say ready.

No Kubernetes API server runs on these machines: the CA talks to the local HTTPS stand-in
of tests/k8s/apiserver.py, which answers TokenReview and pod reads with the shapes the
Kubernetes API documents. Two things a cluster would provide are given explicitly: the
Service's DNS name resolves to 127.0.0.1 (the agent dials 127.0.0.1 and checks the CA's
certificate for the Service name, `ca.server_name`), and the CA's automounted
service-account files are named by MESHTLS_CA_KUBERNETES_CA_FILE/_TOKEN_FILE (their
in-pod default paths cannot be mapped)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helm.chart import NAMESPACE, config_file, merge, notes, render, user_values
from tests.helm.pods import Container
from tests.k8s.apiserver import StandInApiServer
from tests.sidecar.helpers import wait_for

SERVICE_HOST = f"meshtls-ca.{NAMESPACE}.svc.cluster.local"
ENTRY_ID = "spiffe://example.org/svc/web"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _http_status(url: str) -> int:
    """What the kubelet would see: the HTTP status, or 200/503 for a gRPC health check
    answered SERVING/anything else (as a `grpc://host:port/service` URL)."""
    if url.startswith("grpc://"):
        address, _, service = url.removeprefix("grpc://").partition("/")
        with grpc.insecure_channel(address) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2
                )
            except grpc.RpcError:
                return 503
        return 200 if answer.status == health_pb2.HealthCheckResponse.SERVING else 503
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 - http to loopback
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _http_body(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - http to loopback
        body: bytes = reply.read()
        return body


def _notes_commands(text: str) -> dict[str, list[str]]:
    """The `kubectl exec deploy/meshtls-ca -- <argv>` lines of NOTES.txt, by subcommand."""
    joined = text.replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in joined.splitlines():
        words = shlex.split(line.strip()) if "exec deploy/meshtls-ca --" in line else []
        if words:
            argv = words[words.index("--") + 1 :]
            argv = argv[: argv.index(">")] if ">" in argv else argv  # the shell's redirection
            out[" ".join(argv[1:3])] = argv
    return out


@pytest.fixture
def root() -> Iterator[Path]:
    # Short: the Unix socket paths under it must stay within 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mtls-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def api(root: Path) -> AsyncIterator[StandInApiServer]:
    server = StandInApiServer(root / "apiserver", caller=f"{NAMESPACE}:meshtls-ca")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running(
    container: Container, env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *container.argv(), env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def _ready(
    container: Container, process: asyncio.subprocess.Process, log: Path, what: str
) -> None:
    url = container.probe_url("readinessProbe")

    def ready() -> bool:
        assert process.returncode is None, f"{what} exited with {process.returncode}"
        return _http_status(url) == 200

    try:
        await wait_for(ready, within=45, what=f"{what} ready at {url}")
    except BaseException:
        print(await asyncio.to_thread(log.read_text, errors="replace"))
        raise
    assert _http_status(container.probe_url("livenessProbe")) == 200
    assert _http_status(container.probe_url("startupProbe")) == 200


async def test_rendered_ca_and_agent_run_and_the_agent_enrolls_with_its_token(
    root: Path, api: StandInApiServer
) -> None:
    agent_port, enroll_port, http_port, health_port, status_port, inbound_port = _free_ports(6)
    values = user_values(
        {
            "global": {"logFormat": "text"},
            "ca": {
                "bindAddress": "127.0.0.1",
                "ports": {
                    "agent": agent_port,
                    "enroll": enroll_port,
                    "http": http_port,
                    "health": health_port,
                },
            },
            "agent": {
                "statusPort": status_port,
                "hostNetwork": True,
                "inbound": [
                    {
                        "name": "web",
                        "listen": f"127.0.0.1:{inbound_port}",
                        "forward": "unix:/run/meshtls/apps/web.sock",
                        "identity": ENTRY_ID,
                        "allow": ["spiffe://example.org"],
                    }
                ],
            },
        }
    )
    # 1. helm install: the CA only; the agents wait for a trust anchor.
    installed = render(values)
    assert not [d for d in installed if d["kind"] == "DaemonSet"]
    ca = Container.of(installed, "Deployment", "meshtls-ca", "ca", root / "ca")
    ca.materialise()
    sa_dir = ca.path("/var/run/secrets/kubernetes.io/serviceaccount")
    sa_dir.mkdir(parents=True)
    (sa_dir / "ca.crt").write_bytes(api.ca_file.read_bytes())
    (sa_dir / "token").write_text(api.ca_token)
    ca_env = ca.env(
        {
            # What the kubelet sets in every pod, and the automounted account files.
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(api.port),
            "MESHTLS_CA_KUBERNETES_CA_FILE": str(sa_dir / "ca.crt"),
            "MESHTLS_CA_KUBERNETES_TOKEN_FILE": str(sa_dir / "token"),
        }
    )
    ca_log = root / "ca.log"
    async with running(ca, ca_env, ca_log) as ca_process:
        await _ready(ca, ca_process, ca_log, "the CA")
        # 2. What NOTES.txt says to run next, run in the CA container.
        steps = _notes_commands(notes(values))
        bundle_pem = await asyncio.to_thread(_exec, ca, ca_env, steps["bundle show"])
        assert "-----BEGIN CERTIFICATE-----" in bundle_pem
        # 3. helm upgrade --set-file agent.trustBundle.pem=...: the agents come.
        upgraded_values = merge(values, {"agent": {"trustBundle": {"pem": bundle_pem}}})
        upgraded = render(upgraded_values)
        assert config_file(upgraded, "meshtls-ca", "config.yaml") == config_file(
            installed, "meshtls-ca", "config.yaml"
        )
        steps = _notes_commands(notes(upgraded_values))
        entry = steps["entry create"]
        entry[entry.index("--spiffe-id") + 1] = ENTRY_ID
        await asyncio.to_thread(_exec, ca, ca_env, entry)

        # 4. The DaemonSet's pod on node-1, with its projected token.
        pod = api.add_pod("meshtls-agent-x7k2p", "node-1")
        token_volume = _volume(upgraded, "token")
        audience = token_volume["projected"]["sources"][0]["serviceAccountToken"]["audience"]
        kw: dict[str, Any] = {"node_name": pod.node_name, "token": api.token_for(pod, (audience,))}
        init = Container.of(upgraded, "DaemonSet", "meshtls-agent", "host-dirs", root / "n1", **kw)
        init.materialise()
        init.run_to_completion()
        agent = Container.of(upgraded, "DaemonSet", "meshtls-agent", "agent", root / "n1", **kw)
        agent.materialise()
        _resolve_service_name(agent.path("/etc/meshtls/agent.yaml"))
        agent_log = root / "agent.log"
        async with running(agent, agent.env(), agent_log) as agent_process:
            await _ready(agent, agent_process, agent_log, "the agent")
            status_url = agent.probe_url("readinessProbe").replace("/readyz", "/status")
            status = json.loads(await asyncio.to_thread(_http_body, status_url))
            assert status["node"]["spiffe_id"] == "spiffe://example.org/meshtls/node/node-1"
            assert [i["spiffe_id"] for i in status["identities"]] == [ENTRY_ID]
            # The CA asked the API server about exactly this token, for the chart's audience.
            review = api.reviews()[-1].body
            assert review["spec"]["audiences"] == [audience]
            nodes = json.loads(
                await asyncio.to_thread(_exec, ca, ca_env, ["meshtls-ca", "node", "list", "--json"])
            )
            assert [n.get("name") for n in nodes] == ["node-1"]
            # The rendered Workload API socket and the proxy listener are up.
            assert agent.path("/run/meshtls/workload.sock").is_socket()
            with socket.create_connection(("127.0.0.1", inbound_port), timeout=5):
                pass


def _exec(container: Container, env: dict[str, str], argv: list[str]) -> str:
    """`kubectl exec` into the container: the same environment, a command on its PATH."""
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable, argv
    done = subprocess.run(
        [executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def _volume(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    from tests.helm.chart import find

    spec = find(docs, "DaemonSet", "meshtls-agent")["spec"]["template"]["spec"]
    return next(v for v in spec["volumes"] if v["name"] == name)


def _resolve_service_name(config_path: Path) -> None:
    """Cluster DNS: the Service name resolves to 127.0.0.1; TLS still checks the name."""
    config = yaml.safe_load(config_path.read_text())
    for key in ("address", "enroll_address"):
        host, _, port = config["ca"][key].rpartition(":")
        assert host == SERVICE_HOST
        config["ca"][key] = f"127.0.0.1:{port}"
    config["ca"]["server_name"] = SERVICE_HOST
    config_path.write_text(yaml.safe_dump(config))
