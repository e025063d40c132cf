"""A local STAND-IN for the Kubernetes API server: no real API server can run on these
machines, so the Kubernetes attestor is tested against this small HTTPS server instead.

It is a plain asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) with real TLS
from a `ThrowawayCA`, and it answers the two calls the attestor makes with the request and
response shapes the Kubernetes API documents (authentication.k8s.io/v1 TokenReview, core
v1 Pod, meta v1 Status for errors):

* `POST /apis/authentication.k8s.io/v1/tokenreviews` -> 201 and the TokenReview with its
  `status` filled in: `authenticated`, `user.username` `system:serviceaccount:<ns>:<sa>`,
  `user.groups`, `user.extra` (`authentication.kubernetes.io/pod-name`, `pod-uid`,
  `node-name`, `credential-id`, each a one-element list) and `audiences`; an unusable token
  gets `authenticated` absent (false) and `error`, as the real server answers. Like the real
  server it checks the token's audiences against `spec.audiences` (or its own audience
  when none is given) and that the pod a token is bound to still exists with that uid.
* `GET /api/v1/namespaces/<ns>/pods/<name>` -> 200 and the Pod (`metadata.name`,
  `metadata.namespace`, `metadata.uid`, `spec.nodeName`, `spec.serviceAccountName`,
  `status.phase`), or 404 and a Status (`reason: NotFound`).

Every call must carry `Authorization: Bearer <the CA's token>` (401 Status otherwise); a
resource in `forbidden` answers 403 like RBAC does. Tokens are opaque random strings here
(the attestor never parses them, it asks the API server). Every request is recorded in
`requests` so tests can check what the attestor sent. `stop()` then `start()` models an
API server outage on the same address; `hang` accepts calls and never answers them;
`after_review` runs after a TokenReview answer (to replace a pod in between, as a race
with the kubelet would).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.support.pki import ThrowawayCA

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"  # the server's own audience
_POD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")
_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized"}
_REASONS |= {403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    uid: str
    node_name: str
    service_account: str
    phase: str = "Running"


@dataclass(frozen=True)
class ServiceAccountToken:
    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    pod: Pod | None  # None: a legacy Secret-based token, bound to no pod
    credential_id: str = field(default_factory=lambda: f"JTI={uuid.uuid4()}")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


def _status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """A meta/v1 Status, the body of every Kubernetes API error."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class StandInApiServer:
    def __init__(self, directory: Path, *, caller: str = "meshtls:meshtls-ca") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.root = ThrowawayCA.root(common_name="stand-in kubernetes cluster CA")
        serving = self.root.leaf(None, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        self._cert_path, self._key_path = serving.write(directory, "apiserver")
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(self.root.cert_pem)
        # The CA's own service-account token, as its pod would have it mounted.
        self.caller = caller  # "<namespace>:<service account>" of the CA
        self.ca_token = secrets.token_urlsafe(32)
        self.token_file = directory / "ca-token"
        self.token_file.write_text(self.ca_token + "\n")
        self.pods: dict[tuple[str, str], Pod] = {}
        self.tokens: dict[str, ServiceAccountToken] = {}
        self.requests: list[Request] = []
        self.forbidden: set[str] = set()  # "tokenreviews" and/or "pods"
        self.hang = False
        self.after_review: Callable[[], object] | None = None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- the cluster's state --------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        node_name: str,
        *,
        namespace: str = "meshtls",
        service_account: str = "meshtls-agent",
        phase: str = "Running",
    ) -> Pod:
        pod = Pod(namespace, name, str(uuid.uuid4()), node_name, service_account, phase)
        self.pods[(namespace, name)] = pod
        return pod

    def delete_pod(self, pod: Pod) -> None:
        self.pods.pop((pod.namespace, pod.name), None)

    def recreate_pod(self, pod: Pod) -> Pod:
        """The same name again with a new uid (deleted and created anew)."""
        fresh = replace(pod, uid=str(uuid.uuid4()))
        self.pods[(pod.namespace, pod.name)] = fresh
        return fresh

    def token_for(self, pod: Pod, audiences: tuple[str, ...] = ("meshtls-ca",)) -> str:
        """A projected service-account token of the pod, as the kubelet would mount it."""
        return self._issue(ServiceAccountToken(pod.namespace, pod.service_account, audiences, pod))

    def unbound_token(
        self, namespace: str, service_account: str, audiences: tuple[str, ...] = ("meshtls-ca",)
    ) -> str:
        """A token bound to no pod, as `kubectl create token SA --audience A` makes."""
        return self._issue(ServiceAccountToken(namespace, service_account, audiences, None))

    def _issue(self, token: ServiceAccountToken) -> str:
        text = "eyJhbGciOiJSUzI1NiJ9." + secrets.token_urlsafe(48)
        self.tokens[text] = token
        return text

    def reviews(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/tokenreviews")]

    # -- serving -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (again, on the same port after a stop)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._cert_path, self._key_path)
        self._release = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open connection (an outage)."""
        self._release.set()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None
        # Let every connection handler finish before the event loop may close.
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self._writers.add(writer)
        try:
            while await self._one_exchange(reader, writer):
                pass
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def _one_exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = Request(method, target.split("?", 1)[0], headers, body)
        self.requests.append(request)
        if self.hang:
            await self._release.wait()
            return False
        code, payload = self._answer(request)
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        if code == 201 and self.after_review is not None:
            self.after_review()
        return headers.get("connection", "").lower() != "close"

    def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        if request.headers.get("authorization") != f"Bearer {self.ca_token}":
            return 401, _status(401, "Unauthorized", "Unauthorized")
        user = f"system:serviceaccount:{self.caller}"
        if request.path == "/apis/authentication.k8s.io/v1/tokenreviews":
            if request.method != "POST":
                return 405, _status(
                    405, "MethodNotAllowed", "the server does not allow this method"
                )
            if "tokenreviews" in self.forbidden:
                return 403, _status(
                    403,
                    "Forbidden",
                    f'tokenreviews.authentication.k8s.io is forbidden: User "{user}" cannot '
                    'create resource "tokenreviews" in API group "authentication.k8s.io" at '
                    "the cluster scope",
                    group="authentication.k8s.io",
                    kind="tokenreviews",
                )
            return self._token_review(request.body)
        match = _POD_PATH.match(request.path)
        if match and request.method == "GET":
            namespace, name = match.groups()
            if "pods" in self.forbidden:
                return 403, _status(
                    403,
                    "Forbidden",
                    f'pods "{name}" is forbidden: User "{user}" cannot get resource "pods" '
                    f'in API group "" in the namespace "{namespace}"',
                    name=name,
                    kind="pods",
                )
            pod = self.pods.get((namespace, name))
            if pod is None:
                return 404, _status(
                    404, "NotFound", f'pods "{name}" not found', name=name, kind="pods"
                )
            return 200, _pod_json(pod)
        return 404, _status(404, "NotFound", "the server could not find the requested resource")

    def _token_review(self, body: Any) -> tuple[int, dict[str, Any]]:
        spec = body.get("spec") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or body.get("apiVersion") != "authentication.k8s.io/v1"
            or body.get("kind") != "TokenReview"
            or not isinstance(spec, dict)
            or not isinstance(spec.get("token"), str)
        ):
            return 400, _status(
                400, "BadRequest", "the body is not an authentication.k8s.io/v1 TokenReview"
            )
        wanted = list(spec.get("audiences") or [API_AUDIENCE])
        review: dict[str, Any] = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        token = self.tokens.get(spec["token"])
        if token is None:
            review["status"] = {
                "user": {},
                "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
            }
            return 201, review
        matched = [a for a in token.audiences if a in wanted]
        if not matched:
            review["status"] = {
                "user": {},
                "error": "[invalid bearer token, token audiences "
                f"{json.dumps(list(token.audiences))} is invalid for the target audiences "
                f"{json.dumps(wanted)}]",
            }
            return 201, review
        extra: dict[str, list[str]] = {
            "authentication.kubernetes.io/credential-id": [token.credential_id]
        }
        if token.pod is not None:
            current = self.pods.get((token.pod.namespace, token.pod.name))
            if current is None or current.uid != token.pod.uid:
                review["status"] = {
                    "user": {},
                    "error": f'[invalid bearer token, pods "{token.pod.name}" not found]',
                }
                return 201, review
            extra["authentication.kubernetes.io/pod-name"] = [token.pod.name]
            extra["authentication.kubernetes.io/pod-uid"] = [token.pod.uid]
            extra["authentication.kubernetes.io/node-name"] = [token.pod.node_name]
        review["status"] = {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{token.namespace}:{token.service_account}",
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, token.service_account)),
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{token.namespace}",
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": matched,
        }
        return 201, review


def _pod_json(pod: Pod) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
        "spec": {
            "nodeName": pod.node_name,
            "serviceAccountName": pod.service_account,
            "containers": [{"name": "meshtls-agent", "image": "meshtls:test"}],
        },
        "status": {"phase": pod.phase},
    }
