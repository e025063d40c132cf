"""The state-of-the-world xDS handshake of one SDS stream, without any I/O.

Per the xDS protocol (envoyproxy.io, "xDS REST and gRPC protocol"):

* Every response carries a `version_info` and a fresh `nonce`.
* Envoy answers each response with a request echoing that nonce: an ACK when
  `error_detail` is empty (its `version_info` is then the one just sent), a NACK otherwise
  (its `version_info` stays at the last version Envoy accepted).
* A request whose `response_nonce` is not the nonce of our latest response is stale (it
  answers something older) and is ignored.
* The first request of a stream (no nonce) and any request that changes the set of
  resource names is answered at once. An ACK or NACK with unchanged names is not: after a
  NACK the same version is never sent again; the next push comes with the next change.
* A change of what the names resolve to is pushed whenever its version differs from the
  last one sent, whether or not that one was acknowledged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    INITIAL = "initial"
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    respond: bool  # answer now, even with a version that was sent before


class SotwStream:
    def __init__(self) -> None:
        self.names: tuple[str, ...] | None = None  # None until the first request
        self.sent_version: str | None = None
        self.nonce: str | None = None  # of the latest response
        self.acked_version: str | None = None
        self.rejected_version: str | None = None
        self._count = 0

    def on_request(
        self, names: tuple[str, ...], version_info: str, response_nonce: str, error: str | None
    ) -> Verdict:
        if response_nonce and response_nonce != self.nonce:
            return Verdict(Kind.STALE, False)
        if not response_nonce:
            kind = Kind.INITIAL
        elif error is not None:
            kind = Kind.NACK
            self.rejected_version = self.sent_version
        else:
            kind = Kind.ACK
            self.acked_version = version_info
        changed = names != self.names
        self.names = names
        return Verdict(kind, kind is Kind.INITIAL or changed)

    def wants(self, version: str, *, forced: bool) -> bool:
        """Whether a response of `version` is due (after a request or on an update)."""
        if self.names is None:
            return False  # nothing asked for yet
        return forced or version != self.sent_version

    def sent(self, version: str) -> str:
        """Record a response of `version`; its nonce."""
        self._count += 1
        self.nonce = str(self._count)
        self.sent_version = version
        return self.nonce
