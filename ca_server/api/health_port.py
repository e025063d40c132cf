"""A plaintext gRPC port that serves only the standard health service, for probes that
cannot speak TLS (the kubelet's `grpc` probe). It reveals nothing but SERVING/NOT_SERVING.

- service "" (liveness): SERVING while the process runs, NOT_SERVING once it is stopping;
- service "readiness" (or "meshtls.v1.AgentService"): SERVING while the database answers
  and the signing intermediate is valid, the same check as HTTP /readyz;
- any other service: NOT_FOUND, as the health protocol asks.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_server.services.context import CAContext
from ca_server.services.readiness import readiness

READINESS_SERVICES = {"readiness", "meshtls.v1.AgentService"}
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ProbeHealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, ctx: CAContext) -> None:
        self._ctx = ctx
        self.stopping = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service == "":
            status = _NOT_SERVING if self.stopping else _SERVING
            return health_pb2.HealthCheckResponse(status=status)
        if request.service in READINESS_SERVICES:
            ready, _ = await readiness(self._ctx)
            ok = ready and not self.stopping
            return health_pb2.HealthCheckResponse(status=_SERVING if ok else _NOT_SERVING)
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        raise AssertionError("unreachable")  # abort raises

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "this probe port answers Check only; use Check"
        )


def build_health_port(
    ctx: CAContext, address: str
) -> tuple[grpc.aio.Server, ProbeHealthServicer, int]:
    """The probe server on `address` (host:port, port 0 for any); returns its bound port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)])
    servicer = ProbeHealthServicer(ctx)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    return server, servicer, port
