"""What the identity manager tells operators: CA reachability, the last error, failures and
renewals counted by reason. The manager records events here; the status page and the
metrics read from here.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from sidecar.errors import (
    CAError,
    CAInvalidArgument,
    CAInvalidResponse,
    CAPermissionDenied,
    CARateLimited,
    CAUnauthenticated,
    CAUnavailable,
)
from sidecar.metrics import SidecarMetrics

log = logging.getLogger(__name__)

_ANSWERS = (
    CAUnauthenticated,
    CAPermissionDenied,
    CAInvalidArgument,
    CARateLimited,
    CAInvalidResponse,
)


@dataclass(frozen=True)
class ErrorInfo:
    operation: str
    reason: str
    message: str
    at: float


class Health:
    def __init__(self, metrics: SidecarMetrics | None) -> None:
        self._metrics = metrics
        self.ca_reachable: bool | None = None
        self.last_contact: float | None = None
        self.last_error: ErrorInfo | None = None
        self.failures: Counter[tuple[str, str]] = Counter()
        self.renewals: Counter[str] = Counter()

    def contacted(self, now: float) -> None:
        self.ca_reachable = True
        self.last_contact = now

    def renewed(self, kind: str, count: int = 1) -> None:
        self.renewals[kind] += count
        if self._metrics is not None:
            self._metrics.renewals.labels(kind=kind).inc(count)

    def failed(self, exc: CAError, now: float) -> None:
        op = exc.operation or "unknown"
        self.failures[(op, exc.reason)] += 1
        if self._metrics is not None:
            self._metrics.renewal_failures.labels(operation=op, reason=exc.reason).inc()
        self.last_error = ErrorInfo(op, exc.reason, exc.message, now)
        if isinstance(exc, CAUnavailable):
            self.ca_reachable = False
        elif isinstance(exc, _ANSWERS):
            self.contacted(now)  # the CA answered, it just said no

    def failures_by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self.failures.items():
            out[reason] += n
        return dict(out)

    def total_failures(self) -> int:
        return sum(self.failures.values())
