"""The four ways the bench connects a load client to the sink:

    direct:   client -> sink
    envoy:    client -> Envoy (tcp_proxy, upstream mTLS) -> Envoy (downstream mTLS) -> sink
    stunnel:  client -> stunnel (client mode)           -> stunnel (server mode)     -> sink
    meshtls:  client -> sidecar outbound listener       -> sidecar inbound listener  -> sink

Every proxy pair speaks TLS 1.3 with P-256 certificates, requires and verifies the client
certificate, and (where the proxy can) checks the peer's SPIFFE ID. Envoy runs with
`--concurrency 1`. Each topology exposes the port the client connects to and the pids whose
CPU and memory are the proxies' cost.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from bench.dataplane.pki import BenchPki, LeafFiles
from bench.dataplane.processes import free_port, start, stop, wait_listening

BIN = Path(sys.executable).parent


class Topology(Protocol):
    name: str
    entry_port: int
    proxy_pids: list[int]

    def start(self, workdir: Path, sink_port: int, pki: BenchPki) -> None: ...

    def stop(self) -> None: ...

    def version(self) -> str: ...


class Direct:
    name = "direct"

    def __init__(self) -> None:
        self.entry_port = 0
        self.proxy_pids: list[int] = []

    def start(self, workdir: Path, sink_port: int, pki: BenchPki) -> None:
        self.entry_port = sink_port

    def stop(self) -> None:
        pass

    def version(self) -> str:
        return "plain TCP"


def _envoy_tls_common(leaf: LeafFiles, root: Path, peer_id: str) -> dict[str, object]:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(leaf.cert)},
                "private_key": {"filename": str(leaf.key)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(root)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer_id}}],
        },
    }


def _envoy_config(
    listen: int, upstream: int, transport: str, tls: dict[str, object]
) -> dict[str, object]:
    tcp_proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "bench",
            "cluster": "upstream",
        },
    }
    chain: dict[str, object] = {"filters": [tcp_proxy]}
    cluster: dict[str, object] = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "5s",
        # The default circuit breaker stops at 1,024 upstream connections; the idle test
        # holds 10,000.
        "circuit_breakers": {"thresholds": [{"max_connections": 1_000_000}]},
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": upstream,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    tls_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
    if transport == "downstream":
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": tls_type + "DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": tls,
            },
        }
    else:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": tls_type + "UpstreamTlsContext", "common_tls_context": tls},
        }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [chain],
                }
            ],
            "clusters": [cluster],
        }
    }


class Envoy:
    name = "envoy"

    def __init__(self) -> None:
        self.entry_port = 0
        self.proxy_pids: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self.binary = shutil.which("envoy", path=str(BIN)) or "envoy"

    def start(self, workdir: Path, sink_port: int, pki: BenchPki) -> None:
        server_port, client_port = free_port(), free_port()
        server = _envoy_config(
            server_port,
            sink_port,
            "downstream",
            _envoy_tls_common(pki.server, pki.root, pki.client.spiffe_id),
        )
        client = _envoy_config(
            client_port,
            server_port,
            "upstream",
            _envoy_tls_common(pki.client, pki.root, pki.server.spiffe_id),
        )
        for role, config in (("server", server), ("client", client)):
            path = workdir / f"envoy-{role}.json"
            path.write_text(json.dumps(config))
            self._procs.append(
                start(
                    [
                        self.binary,
                        "-c",
                        str(path),
                        "--concurrency",
                        "1",
                        "--disable-hot-restart",
                        "-l",
                        "warning",
                    ],
                    workdir / f"envoy-{role}.log",
                )
            )
        wait_listening(server_port, self._procs)
        wait_listening(client_port, self._procs)
        self.entry_port = client_port
        self.proxy_pids = [p.pid for p in self._procs]

    def stop(self) -> None:
        for proc in self._procs:
            stop(proc)
        self._procs = []

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        ).stdout
        found = re.search(r"version: \w+/([\d.]+)/", out)
        return f"envoy {found.group(1)}" if found else "envoy"


class Stunnel:
    name = "stunnel"

    def __init__(self) -> None:
        self.entry_port = 0
        self.proxy_pids: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self.binary = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"

    def start(self, workdir: Path, sink_port: int, pki: BenchPki) -> None:
        server_port, client_port = free_port(), free_port()
        common = "foreground = yes\npid =\nsyslog = no\ndebug = 3\n"
        server = (
            common
            + f"[inbound]\naccept = 127.0.0.1:{server_port}\nconnect = 127.0.0.1:{sink_port}\n"
            f"cert = {pki.server.cert}\nkey = {pki.server.key}\nCAfile = {pki.root}\n"
            "verifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n"
        )
        client = (
            common + f"[outbound]\nclient = yes\naccept = 127.0.0.1:{client_port}\n"
            f"connect = 127.0.0.1:{server_port}\n"
            f"cert = {pki.client.cert}\nkey = {pki.client.key}\nCAfile = {pki.root}\n"
            "verifyChain = yes\nsslVersionMin = TLSv1.3\n"
        )
        for role, text in (("server", server), ("client", client)):
            path = workdir / f"stunnel-{role}.conf"
            path.write_text(text)
            self._procs.append(start([self.binary, str(path)], workdir / f"stunnel-{role}.log"))
        wait_listening(server_port, self._procs)
        wait_listening(client_port, self._procs)
        self.entry_port = client_port
        self.proxy_pids = [p.pid for p in self._procs]

    def stop(self) -> None:
        for proc in self._procs:
            stop(proc)
        self._procs = []

    def version(self) -> str:
        out = subprocess.run([self.binary, "-version"], capture_output=True, text=True, check=False)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("stunnel "):
                return " ".join(line.split()[:2])
        return "stunnel"
