"""The CA's loopback HTTP endpoint: /healthz (the process answers), /readyz (the database
answers and the signing intermediate is valid), /metrics (Prometheus)."""

from __future__ import annotations

from ca_server.services.context import CAContext
from ca_server.services.readiness import readiness
from meshtls.statushttp import Request, Response, StatusServer, metrics_handler


def build_status_server(ctx: CAContext, host: str, port: int) -> StatusServer:
    async def healthz(_: Request) -> Response:
        return Response.text("ok")

    async def readyz(_: Request) -> Response:
        ready, why = await readiness(ctx)
        return Response.text(why, 200 if ready else 503)

    return StatusServer(
        {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_handler(ctx.metrics.registry)},
        host=host,
        port=port,
    )
