"""Mapping gRPC failures to the sidecar's errors, with the CA's message and retry hint."""

from __future__ import annotations

import grpc
import pytest

from sidecar.errors import (
    CAError,
    CAInvalidArgument,
    CAPermissionDenied,
    CARateLimited,
    CAUnauthenticated,
    CAUnavailable,
)
from sidecar.fields import Address
from sidecar.identity.ca_errors import map_rpc_error, retry_after_of

ADDRESS = Address("ca.internal", 8443)


def rpc_error(
    code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details=details
    )


@pytest.mark.parametrize(
    ("code", "cls", "reason"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, CAUnauthenticated, "unauthenticated"),
        (grpc.StatusCode.PERMISSION_DENIED, CAPermissionDenied, "permission_denied"),
        (grpc.StatusCode.INVALID_ARGUMENT, CAInvalidArgument, "invalid_argument"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, CARateLimited, "rate_limited"),
        (grpc.StatusCode.UNAVAILABLE, CAUnavailable, "unavailable"),
        (grpc.StatusCode.INTERNAL, CAError, "internal"),
    ],
)
def test_status_codes_map_to_error_types(
    code: grpc.StatusCode, cls: type[CAError], reason: str
) -> None:
    err = map_rpc_error(rpc_error(code, "node web-1 is banned"), "renew_node", ADDRESS)
    assert type(err) is cls
    assert err.reason == reason
    assert err.operation == "renew_node"
    assert "node web-1 is banned" in err.message or code == grpc.StatusCode.UNAVAILABLE
    assert str(err).startswith("renew_node: ")


def test_unavailable_names_the_address() -> None:
    err = map_rpc_error(
        rpc_error(grpc.StatusCode.UNAVAILABLE, "Connection refused"), "enroll", ADDRESS
    )
    assert err.message == "cannot reach the CA at ca.internal:8443: Connection refused"
    timeout = map_rpc_error(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, ""), "enroll", ADDRESS)
    assert isinstance(timeout, CAUnavailable)
    assert "did not answer in time" in timeout.message


def test_retry_after_trailer_is_honoured() -> None:
    err = map_rpc_error(
        rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("retry-after", "12.5"),)),
        "sign_identities",
        ADDRESS,
    )
    assert err.retry_after == 12.5


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("retry-after", "3"),), 3.0),
        ((("Retry-After", b"0.25"),), 0.25),
        ((("other", "1"),), None),
        ((("retry-after", "soon"),), None),
        ((("retry-after", "-4"),), None),
        ((), None),
        (None, None),
    ],
)
def test_retry_after_of(metadata: object, expected: float | None) -> None:
    assert retry_after_of(metadata) == expected
