"""The two Kubernetes API calls node attestation needs, over HTTPS with httpx.

* `POST /apis/authentication.k8s.io/v1/tokenreviews`: has the API server check a token.
* `GET /api/v1/namespaces/<ns>/pods/<name>`: read the pod a token is bound to.

The CA authenticates with its own service-account token, re-read from `token_file` on every
call (the kubelet rotates it), and verifies the API server against `ca_file`. The proxy
variables of the environment are ignored: the API server is reached directly, as its
in-cluster address says. Every transport or HTTP failure becomes `Unavailable` with a
message that names the API server and what to fix; the sidecar retries with backoff.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

import meshtls
from ca_server.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 - a URL path
# Per call; an enrollment makes two calls and the sidecar's default deadline is 10 s, so
# the CA answers UNAVAILABLE before the sidecar gives up waiting.
DEFAULT_TIMEOUT_SECONDS = 4.0
# Calls in flight to the API server from this replica at most (a DaemonSet rollout makes
# every node enroll at once); a call waiting longer than the timeout for a slot fails.
MAX_CONNECTIONS = 16


def ssl_context(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts only the roots in `ca_file`; ConfigError if unusable."""
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise ConfigError(
            f"kubernetes.ca_file: {ca_file} does not exist (in a pod it is "
            "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"kubernetes.ca_file: cannot load {ca_file}: {exc}") from None


def _status_message(response: httpx.Response) -> str:
    """The `message` of a Kubernetes Status body, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:500]
    return response.reason_phrase


def _transport_problem(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"its certificate does not verify against kubernetes.ca_file ({text})"
    return text


class KubernetesApi:
    """A connection pool to one API server. Create inside the event loop that uses it."""

    def __init__(
        self,
        api_server: str,
        ca_file: Path,
        token_file: Path,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.api_server = api_server
        self._token_file = token_file
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=api_server,
            verify=ssl_context(ca_file),
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
            ),
            trust_env=False,
            headers={
                "Accept": "application/json",
                "User-Agent": f"meshtls-ca/{meshtls.__version__}",
            },
        )

    async def close(self) -> None:
        await self._client.aclose()

    def check_token_file(self) -> None:
        """ConfigError if the CA's own token cannot be read (checked once at startup)."""
        try:
            self._caller_token()
        except Unavailable as exc:
            raise ConfigError(exc.message) from None

    async def create_token_review(self, token: str, audiences: Sequence[str]) -> dict[str, Any]:
        """The TokenReview the API server returns for `token` (its `status` says the verdict)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        review = await self._request(
            "POST", TOKEN_REVIEW_PATH, body, what="create tokenreviews.authentication.k8s.io"
        )
        assert review is not None
        return review

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod, or None if it does not exist."""
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        return await self._request(
            "GET", path, None, what=f"get pods in namespace {namespace}", missing_ok=True
        )

    def _caller_token(self) -> str:
        try:
            token = self._token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            problem = getattr(exc, "strerror", None) or str(exc)
            raise Unavailable(
                f"cannot read the CA's own service-account token {self._token_file} "
                f"(kubernetes.token_file): {problem}"
            ) from None
        if not token:
            raise Unavailable(
                f"the CA's own service-account token file {self._token_file} "
                "(kubernetes.token_file) is empty"
            )
        return token

    async def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        what: str,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        headers = {"Authorization": f"Bearer {self._caller_token()}"}
        try:
            response = await self._client.request(method, path, json=body, headers=headers)
        except httpx.TimeoutException:
            raise self._unavailable(
                f"the Kubernetes API server at {self.api_server} did not answer within "
                f"{self._timeout:g}s ({what})"
            ) from None
        except httpx.HTTPError as exc:
            raise self._unavailable(
                f"cannot reach the Kubernetes API server at {self.api_server} ({what}): "
                f"{_transport_problem(exc)}"
            ) from None
        status = response.status_code
        if status == 404 and missing_ok:
            return None
        if status == 401:
            raise self._unavailable(
                f"the Kubernetes API server at {self.api_server} did not accept the CA's own "
                f"service-account token from {self._token_file} (HTTP 401): "
                f"{_status_message(response)}"
            )
        if status == 403:
            raise self._unavailable(
                f"the Kubernetes API server at {self.api_server} does not allow the CA to "
                f"{what} (HTTP 403): grant its service account that permission in RBAC "
                f"({_status_message(response)})"
            )
        if not 200 <= status < 300:
            raise self._unavailable(
                f"the Kubernetes API server at {self.api_server} answered HTTP {status} to "
                f"{what}: {_status_message(response)}"
            )
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._unavailable(
                f"the Kubernetes API server at {self.api_server} answered {what} with "
                "something that is not a JSON object"
            )
        return data

    def _unavailable(self, message: str) -> Unavailable:
        log.warning(
            "Kubernetes API call failed", extra={"api_server": self.api_server, "error": message}
        )
        return Unavailable(message)
