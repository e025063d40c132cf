"""The generated KEK survives `helm upgrade`: the chart reads the existing Secret back with
Helm's `lookup` and renders the same value. Rendered by the real Helm engine with cluster
access (helm_python.Config.render, where `lookup` asks the API server) against a small local
STAND-IN for the API server: no Kubernetes API server runs on these machines. It answers
the two calls `lookup` makes, with the documented shapes: the core/v1 discovery document
(`GET /api/v1`, an APIResourceList) and `GET /api/v1/namespaces/<ns>/secrets/<name>` (the
Secret, or a 404 Status)."""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import helm_python
import pytest
import yaml

from tests.helm.chart import CHART, NAMESPACE, RELEASE

SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets/meshtls-ca-kek"


class ApiStandIn(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.secrets: dict[str, dict[str, Any]] = {}
        self.paths: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    server: ApiStandIn

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.server.paths.append(path)
        if path == "/api/v1":
            resource = {"name": "secrets", "singularName": "secret", "namespaced": True}
            resource |= {"kind": "Secret", "verbs": ["get", "list", "create", "update"]}
            self._reply(
                200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [resource]}
            )
        elif path in self.server.secrets:
            self._reply(200, self.server.secrets[path])
        else:
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
            self._reply(404, status | {"reason": "NotFound", "code": 404})

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def api() -> Iterator[ApiStandIn]:
    server = ApiStandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _render_kek(api: ApiStandIn, *, upgrade: bool) -> str:
    url = f"http://127.0.0.1:{api.server_address[1]}"
    with (
        helm_python.Config(kube_apiserver=url, kube_token="t", namespace=NAMESPACE) as config,
        helm_python.Chart.load(CHART) as chart,
    ):
        rendered = config.render(
            chart, name=RELEASE, namespace=NAMESPACE, is_upgrade=upgrade, is_install=not upgrade
        )
    doc = yaml.safe_load(rendered["meshtls/templates/ca-kek-secret.yaml"])
    return base64.b64decode(doc["data"]["kek"]).decode()


def test_upgrade_renders_the_kek_the_cluster_holds(api: ApiStandIn) -> None:
    installed = _render_kek(api, upgrade=False)  # nothing in the cluster yet: a new key
    assert SECRET_PATH in api.paths
    assert len(base64.b64decode(installed)) == 32
    stored = base64.b64encode(secrets.token_bytes(32)).decode()
    encoded = base64.b64encode(stored.encode()).decode()
    api.secrets[SECRET_PATH] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "meshtls-ca-kek", "namespace": NAMESPACE},
        "data": {"kek": encoded},
    }
    assert _render_kek(api, upgrade=True) == stored
    assert _render_kek(api, upgrade=True) == stored
