"""Node attestation: how a node that holds no certificate yet proves which node it is.

Join tokens are checked in `ca_server.services.nodes` itself (they live in our database).
The attestors here ask a platform instead; each one turns a credential into an
`Attestation` or raises a `CAError` (UNAUTHENTICATED: the credential proves nothing;
PERMISSION_DENIED: it proves an identity that may not enroll this node; UNAVAILABLE: the
platform could not be asked). `services.nodes.enroll_attested` then issues the node
certificate exactly as for a join token.

* `k8s.py`: Kubernetes projected service-account tokens (TokenReview + the pod's node),
  over the API client in `k8s_api.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Attestation:
    """What an attestor proved about the caller."""

    node_name: str
    method: str  # how, for the audit trail: "k8s_psat"
    actor: str  # who the audit trail names, e.g. "k8s:meshtls/meshtls-agent"
    # Facts for the audit trail and the log (never a credential).
    details: Mapping[str, str] = field(default_factory=dict)


class NodeAttestor(Protocol):
    async def attest(self, credential: str, node_name: str) -> Attestation:
        """Check `credential`, which claims to come from node `node_name`."""
        ...

    async def close(self) -> None:
        """Release connections (the CA is stopping)."""
        ...
