"""The meshtls topology: a real `meshtls-ca serve` and two real `meshtls-sidecar run`
processes, enrolled with join tokens; the client sidecar's outbound listener connects to
the server sidecar's inbound listener, which forwards to the sink. Only the two sidecars
count as the proxies' cost (the CA is idle once identities are issued)."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from pathlib import Path

import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.dataplane.pki import BenchPki
from bench.dataplane.processes import free_port, start, stop, wait_listening, wait_until
from bench.issuance import BIN, TD, CAProcess
from meshtls.identity.pem import certs_from_der, certs_to_pem
from meshtls.v1 import admin_pb2, admin_pb2_grpc, types_pb2

CLIENT_ID = f"spiffe://{TD}/client"
SERVER_ID = f"spiffe://{TD}/server"


async def _register(ca: CAProcess) -> tuple[bytes, str, str]:
    """Entries for both services, a join token per node; returns (bundle PEM, tokens)."""
    sock = f"unix://{(ca.data_dir / 'admin.sock').resolve()}"
    async with grpc.aio.insecure_channel(sock) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        bundle = await admin.GetTrustBundle(types_pb2.GetTrustBundleRequest())
        tokens = []
        for node, spiffe_id in (("bench-client", CLIENT_ID), ("bench-server", SERVER_ID)):
            await admin.CreateEntry(
                admin_pb2.CreateEntryRequest(spiffe_id=spiffe_id, node_name=node)
            )
            answer = await admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name=node))
            tokens.append(answer.token)
    return certs_to_pem(certs_from_der(bundle.root_certificates)), tokens[0], tokens[1]


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    def ready() -> bool:
        with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback
            return bool(answer.status == 200)

    wait_until(ready, f"{url} not ready", procs, timeout)


class Meshtls:
    name = "meshtls"

    def __init__(self, *, access_log: bool = False) -> None:
        # Without the access log the sidecars run at --log-level warning (Envoy in this
        # bench has no access log either).
        self.access_log = access_log
        self.status_ports: list[int] = []
        self.entry_port = 0
        self.proxy_pids: list[int] = []
        self._ca: CAProcess | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, workdir: Path, sink_port: int, pki: BenchPki) -> None:
        self._ca = ca = CAProcess(workdir, None)
        bundle, client_token, server_token = asyncio.run(_register(ca))
        (workdir / "bundle.pem").write_bytes(bundle)
        inbound_port, outbound_port = free_port(), free_port()
        common_ca = {
            "address": ca.agent,
            "enroll_address": ca.enroll,
            "trust_bundle": str(workdir / "bundle.pem"),
        }
        sidecars: dict[str, tuple[str, str, dict[str, object]]] = {
            "server": (
                "bench-server",
                server_token,
                {
                    "inbound": [
                        {
                            "name": "sink",
                            "listen": f"127.0.0.1:{inbound_port}",
                            "forward": f"127.0.0.1:{sink_port}",
                            "identity": SERVER_ID,
                            "allow": [CLIENT_ID],
                        }
                    ]
                },
            ),
            "client": (
                "bench-client",
                client_token,
                {
                    "outbound": [
                        {
                            "name": "sink",
                            "listen": f"127.0.0.1:{outbound_port}",
                            "connect": f"127.0.0.1:{inbound_port}",
                            "identity": CLIENT_ID,
                            "expect": SERVER_ID,
                        }
                    ]
                },
            ),
        }
        ready_urls = []
        for role, (node, token, listeners) in sidecars.items():
            (workdir / f"{role}.token").write_text(token)
            status_port = free_port()
            config = {
                "trust_domain": TD,
                "node": node,
                "state_dir": str(workdir / f"{role}-state"),
                "ca": {**common_ca, "join_token_file": str(workdir / f"{role}.token")},
                "status": {"listen": f"127.0.0.1:{status_port}"},
                **listeners,
            }
            path = workdir / f"sidecar-{role}.yaml"
            path.write_text(yaml.safe_dump(config))
            level = "info" if self.access_log else "warning"
            command = [str(BIN / "meshtls-sidecar"), "run", "--config", str(path)]
            self._procs.append(
                start(
                    [*command, "--log-level", level],
                    workdir / f"sidecar-{role}.log",
                )
            )
            self.status_ports.append(status_port)
            ready_urls.append(f"http://127.0.0.1:{status_port}/readyz")
        for url in ready_urls:
            _wait_ready(url, self._procs)
        wait_listening(inbound_port, self._procs)
        wait_listening(outbound_port, self._procs)
        self.entry_port = outbound_port
        self.proxy_pids = [p.pid for p in self._procs]

    def handshakes(self) -> tuple[int, int]:
        """(accepted, resumed) TLS handshakes of the client sidecar's outbound listener."""
        url = f"http://127.0.0.1:{self.status_ports[1]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        found = {"accepted": 0.0, "resumed": 0.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "meshtls_proxy_handshakes_total" and s.labels["result"] == "accepted":
                    found["accepted"] += s.value
                elif s.name == "meshtls_proxy_resumed_handshakes_total":
                    found["resumed"] += s.value
        return int(found["accepted"]), int(found["resumed"])

    def stop(self) -> None:
        for proc in self._procs:
            stop(proc)
        self._procs = []
        if self._ca is not None:
            self._ca.stop()
            self._ca = None

    def version(self) -> str:
        from importlib.metadata import version

        return f"meshtls {version('meshtls')}"
