"""gRPC failures of calls to the CA, mapped to `sidecar.errors`: each status code to one
`CAError` subclass carrying the CA's message and its `retry-after` hint, with a hint for
the operator when a TLS handshake failed; and the cancellation gRPC raises into a call
whose channel was closed under it, told apart from the cancellation of the caller."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from sidecar.errors import (
    CAError,
    CAInvalidArgument,
    CAPermissionDenied,
    CARateLimited,
    CATLSFailed,
    CAUnauthenticated,
    CAUnavailable,
)
from sidecar.fields import Address

_ERRORS: dict[Any, type[CAError]] = {
    grpc.StatusCode.UNAVAILABLE: CAUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: CAUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: CAUnauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: CAPermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: CAInvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CARateLimited,
}


def retry_after_of(metadata: object) -> float | None:
    """The `retry-after` trailer as seconds, or None when absent or unreadable."""
    if not metadata:
        return None
    try:
        items = list(metadata)  # type: ignore[call-overload]
    except TypeError:
        return None
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if str(key).lower() == "retry-after":
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                seconds = float(text.strip())
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


def _tls_hint(details: str) -> str | None:
    """What an operator should check for a handshake failure gRPC reports as UNAVAILABLE."""
    text = details.lower()
    if "certificate_verify_failed" in text or "unable to get local issuer" in text:
        return (
            "the CA's certificate does not verify against our trust bundle; check "
            "ca.trust_bundle (or ca.root_fingerprint)"
        )
    if "peer name" in text or "hostname" in text or "subject alternative" in text:
        return "the CA's certificate does not name the address we dialled; set ca.server_name"
    if "handshake" in text or "ssl_error" in text or "alert" in text:
        return "the TLS handshake was refused (an expired or unknown client certificate?)"
    return None


def map_rpc_error(exc: grpc.aio.AioRpcError, operation: str, address: Address) -> CAError:
    """Turn a gRPC failure into the sidecar's error type, keeping the CA's words."""
    code = exc.code()
    details = exc.details() or ""
    retry_after = retry_after_of(exc.trailing_metadata())
    cls = _ERRORS.get(code, CAError)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the CA at {address} did not answer in time"
    elif code == grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach the CA at {address}: {details or 'unavailable'}"
        hint = _tls_hint(details)
        if hint:
            cls = CATLSFailed
            message = f"TLS with the CA at {address} failed: {hint} ({details})"
    else:
        message = details or f"the CA answered {code.name}"
    err = cls(message, operation=operation, retry_after=retry_after)
    if cls is CAError:
        err.reason = code.name.lower()
    return err


def we_are_cancelled() -> bool:
    """gRPC aio raises CancelledError into a call whose channel was closed; tell that apart
    from the cancellation of our own task, which must propagate."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def channel_closed(operation: str) -> CAError:
    """The error for a call cut off because its channel was closed (credentials changed)."""
    err = CAError("the connection to the CA was closed (credentials changed)", operation=operation)
    err.reason = "cancelled"
    return err
