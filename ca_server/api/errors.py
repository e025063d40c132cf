"""The one place where CA errors become gRPC statuses."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ca_server import errors
from ca_server.metrics import CAMetrics

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[errors.CAError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

RETRY_AFTER_KEY = "retry-after"


def status_for(exc: errors.CAError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def rpc(
    metrics_of: Callable[[Any], CAMetrics],
) -> Callable[[Handler[Req, Resp]], Handler[Req, Resp]]:
    """Wrap a unary servicer method: latency and failure metrics, CAError -> status, and an
    opaque INTERNAL (with a request id that is also logged) for anything unexpected."""

    def decorate(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
        method = handler.__name__

        @functools.wraps(handler)
        async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            metrics = metrics_of(self)
            started = time.perf_counter()
            try:
                return await handler(self, request, context)
            except errors.CAError as exc:
                code = status_for(exc)
                metrics.failures.labels(method, code.name).inc()
                log.info(
                    "request refused",
                    extra={
                        "method": method,
                        "code": code.name,
                        "reason": exc.message,
                        "peer": context.peer(),
                    },
                )
                if exc.retry_after is not None:
                    context.set_trailing_metadata(((RETRY_AFTER_KEY, f"{exc.retry_after:.3f}"),))
                await context.abort(code, exc.message)
                raise AssertionError("unreachable") from None
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                request_id = uuid.uuid4().hex[:12]
                metrics.failures.labels(method, "INTERNAL").inc()
                log.exception("request failed", extra={"method": method, "request_id": request_id})
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
                )
                raise AssertionError("unreachable") from None
            finally:
                metrics.latency.labels(method).observe(time.perf_counter() - started)

        return wrapper

    return decorate
