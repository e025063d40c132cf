"""Kubernetes node attestation with projected service-account tokens (method "k8s_psat").

A DaemonSet cannot hand each node its own join token, so the sidecar sends the token the
kubelet projects into its pod (audience `kubernetes.audience`) and the node it runs on.
The CA then:

1. asks the API server to review the token (TokenReview with `spec.audiences =
   [audience]`); it must be authenticated, for that audience;
2. requires the user `system:serviceaccount:<ns>:<name>` with `<ns>/<name>` in
   `kubernetes.allowed_service_accounts`;
3. takes the pod the token is bound to from `status.user.extra`
   (`authentication.kubernetes.io/pod-name` and `pod-uid`); a token not bound to a pod (a
   legacy Secret token) is refused;
4. reads that pod: it must exist with the same uid, be Running, and run on the node the
   sidecar named (its `spec.nodeName`).

The node identity is then issued as for a join token (`services.nodes.enroll_attested`).
Refusals: UNAUTHENTICATED when the token proves nothing (not authenticated, wrong
audience, not bound to a pod, the pod is gone or was replaced), PERMISSION_DENIED when it
proves an identity that may not have this node (service account not allowed, pod not
Running, pod on another node), UNAVAILABLE when the API server cannot be asked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ca_server.attestation import Attestation
from ca_server.attestation.k8s_api import DEFAULT_TIMEOUT_SECONDS, KubernetesApi
from ca_server.config import KubernetesConfig
from ca_server.errors import PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

METHOD = "k8s_psat"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"


@dataclass(frozen=True)
class BoundPod:
    """The service account a reviewed token belongs to and the pod it is bound to."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.pod_name}"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _single(extra: dict[str, Any], key: str) -> str:
    """A TokenReview `user.extra` value: a list holding one string."""
    values = extra.get(key)
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return ""


class KubernetesAttestor:
    def __init__(self, config: KubernetesConfig, api: KubernetesApi) -> None:
        self.config = config
        self._api = api

    @classmethod
    def from_config(
        cls, config: KubernetesConfig, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> KubernetesAttestor:
        """ConfigError at once if the CA file or the CA's own token cannot be read."""
        api = KubernetesApi(config.api_server, config.ca_file, config.token_file, timeout=timeout)
        api.check_token_file()
        return cls(config, api)

    async def close(self) -> None:
        await self._api.close()

    async def attest(self, credential: str, node_name: str) -> Attestation:
        review = await self._api.create_token_review(credential, [self.config.audience])
        bound = self._check_review(review)
        pod = await self._api.get_pod(bound.namespace, bound.pod_name)
        self._check_pod(bound, pod, node_name)
        log.info(
            "Kubernetes pod attested",
            extra={
                "node": node_name,
                "pod": bound.pod,
                "pod_uid": bound.pod_uid,
                "service_account": f"{bound.namespace}/{bound.service_account}",
            },
        )
        return Attestation(
            node_name=node_name,
            method=METHOD,
            actor=f"k8s:{bound.namespace}/{bound.service_account}",
            details={
                "pod": bound.pod,
                "pod_uid": bound.pod_uid,
                "service_account": f"{bound.namespace}/{bound.service_account}",
            },
        )

    def _check_review(self, review: dict[str, Any]) -> BoundPod:
        audience = self.config.audience
        status = review.get("status")
        if not isinstance(status, dict):
            raise Unavailable(
                f"the Kubernetes API server at {self._api.api_server} returned a TokenReview "
                "without a status"
            )
        if status.get("authenticated") is not True:
            reason = str(status.get("error") or "no reason given")[:300]
            raise Unauthenticated(
                f"the Kubernetes API server did not authenticate the service-account token "
                f"for audience {audience!r}: {reason}. The sidecar must send a projected "
                f"service-account token with that audience (ca.kubernetes_token_file)"
            )
        audiences = status.get("audiences")
        if isinstance(audiences, list) and audience not in audiences:
            raise Unauthenticated(
                f"the service-account token is valid for audiences {audiences}, not for "
                f"{audience!r}"
            )
        user = _mapping(status.get("user"))
        username = str(user.get("username") or "")
        allowed = self.config.allowed_service_accounts
        namespace, _, account = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
        if not username.startswith(SERVICE_ACCOUNT_PREFIX) or not namespace or not account:
            raise PermissionDenied(
                f"the token belongs to {username!r}, not to a service account; only pods of "
                f"{', '.join(allowed)} may enroll nodes"
            )
        if f"{namespace}/{account}" not in allowed:
            raise PermissionDenied(
                f"service account {namespace}/{account} may not enroll nodes; allowed: "
                f"{', '.join(allowed)} (kubernetes.allowed_service_accounts)"
            )
        extra = _mapping(user.get("extra"))
        pod_name, pod_uid = _single(extra, POD_NAME_KEY), _single(extra, POD_UID_KEY)
        if not pod_name or not pod_uid:
            raise Unauthenticated(
                f"the token of service account {namespace}/{account} is not bound to a pod: "
                "mount a projected serviceAccountToken volume with audience "
                f"{audience!r} in the agent pod (not a Secret-based token)"
            )
        return BoundPod(namespace, account, pod_name, pod_uid)

    def _check_pod(self, bound: BoundPod, pod: dict[str, Any] | None, node_name: str) -> None:
        if pod is None:
            raise Unauthenticated(
                f"pod {bound.pod}, to which the service-account token is bound, does not exist"
            )
        uid = str(_mapping(pod.get("metadata")).get("uid") or "")
        if uid != bound.pod_uid:
            raise Unauthenticated(
                f"the service-account token is bound to pod {bound.pod} with uid "
                f"{bound.pod_uid}, but that pod now has uid {uid or 'none'} (it was "
                "replaced); the new pod enrolls with its own token"
            )
        phase = str(_mapping(pod.get("status")).get("phase") or "")
        if phase != "Running":
            raise PermissionDenied(f"pod {bound.pod} is {phase or 'in no phase'}, not Running")
        pod_node = str(_mapping(pod.get("spec")).get("nodeName") or "")
        if pod_node != node_name:
            raise PermissionDenied(
                f"pod {bound.pod} runs on node {pod_node or '(none)'!r}, but the sidecar asked "
                f"for the identity of node {node_name!r}; set MESHTLS_NODE_NAME from the "
                "pod's spec.nodeName (a fieldRef)"
            )
