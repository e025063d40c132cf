"""The CA's loopback HTTP endpoint: /healthz (the process answers), /readyz (the database
answers and the signing intermediate is valid), /metrics (Prometheus)."""

from __future__ import annotations

from ca_server.errors import CAError
from ca_server.services.context import CAContext
from meshtls.statushttp import Request, Response, StatusServer, metrics_handler


def build_status_server(ctx: CAContext, host: str, port: int) -> StatusServer:
    async def healthz(_: Request) -> Response:
        return Response.text("ok")

    async def readyz(_: Request) -> Response:
        try:
            await ctx.read(lambda tx: tx.bundle_version())
        except CAError as exc:
            return Response.text(f"not ready: {exc.message}", 503)
        signer = ctx.trust.keyring.signer
        if ctx.clock.now() >= signer.not_after:
            return Response.text(
                f"not ready: the signing intermediate {signer.authority_id} has expired", 503
            )
        return Response.text("ready")

    return StatusServer(
        {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_handler(ctx.metrics.registry)},
        host=host,
        port=port,
    )
