"""The sidecar's own error types.

Everything that can go wrong talking to the CA is mapped, at the edge
(`sidecar.identity.ca_errors`), to one `CAError` subclass carrying the CA's human-readable
message, a short machine `reason` (used as a metrics label) and, when the CA asked for it,
a `retry_after` hint in seconds. Nothing above the client sees a raw gRPC exception.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(SidecarError):
    """The configuration is invalid; raised at startup, before anything runs."""


class StateError(SidecarError):
    """A file in the state directory is corrupt, partial or fails validation."""


class CAError(SidecarError):
    """A call to the CA failed. `reason` is a stable label such as "unavailable"."""

    reason = "ca_error"

    def __init__(
        self, message: str, *, operation: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.retry_after = retry_after

    def __str__(self) -> str:
        prefix = f"{self.operation}: " if self.operation else ""
        return f"{prefix}{self.message}"


class CAUnavailable(CAError):
    """The CA could not be reached or did not answer in time (it may be down)."""

    reason = "unavailable"


class CATLSFailed(CAUnavailable):
    """The TLS handshake with the CA failed (untrusted certificate, wrong name...)."""

    reason = "tls_failed"


class CAUnauthenticated(CAError):
    """The CA did not accept our credentials (join token or node certificate)."""

    reason = "unauthenticated"


class CAPermissionDenied(CAError):
    """The CA knows this node but refuses the request (banned node, foreign entry)."""

    reason = "permission_denied"


class CAInvalidArgument(CAError):
    """The CA rejected the request as malformed (for example a bad CSR)."""

    reason = "invalid_argument"


class CARateLimited(CAError):
    """The CA asked us to slow down; `retry_after` says for how long."""

    reason = "rate_limited"


class CAInvalidResponse(CAError):
    """The CA answered with something we cannot accept (bad chain, wrong identity...)."""

    reason = "invalid_response"


class NoJoinToken(CAError):
    """Enrollment is needed but no (new) join token has been provided."""

    reason = "no_join_token"


class UntrustedBundle(CAError):
    """The trust bundle fetched for a pinned root does not contain that root."""

    reason = "untrusted_bundle"
