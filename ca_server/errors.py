"""The CA's one error hierarchy. The RPC layer maps each class to one gRPC status code
(`ca_server.api.errors`); `message` is for the caller and never carries secrets."""

from __future__ import annotations


class CAError(Exception):
    """Base of every error the CA reports to a caller."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequest(CAError):
    """Malformed or out-of-policy input (bad CSR, weak key, bad SPIFFE ID, too many CSRs)."""


class Unauthenticated(CAError):
    """The caller did not prove who it is (no, expired, foreign or superseded certificate;
    unknown, expired or used join token)."""


class PermissionDenied(CAError):
    """The caller is known but may not do this (banned node, identity of another node)."""


class NotFound(CAError):
    """The named object does not exist."""


class AlreadyExists(CAError):
    """An object with the same identity exists."""


class FailedPrecondition(CAError):
    """The system is not in a state that allows this (e.g. no active signing authority)."""


class ResourceExhausted(CAError):
    """A rate limit or size limit was hit; `retry_after` says when to try again."""


class Unavailable(CAError):
    """A dependency (the database) is down; the caller may retry."""


class ConfigError(Exception):
    """The configuration is invalid; raised at startup, before anything listens."""
