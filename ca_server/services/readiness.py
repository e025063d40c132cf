"""Whether this CA replica can do its job: the database answers and the signing
intermediate is still valid. Shared by the HTTP /readyz endpoint and the gRPC health port."""

from __future__ import annotations

from ca_server.errors import CAError
from ca_server.services.context import CAContext


async def readiness(ctx: CAContext) -> tuple[bool, str]:
    """(ready, why): `why` is "ready" or what is wrong, in words for an operator."""
    try:
        await ctx.read(lambda tx: tx.bundle_version())
    except CAError as exc:
        return False, f"not ready: {exc.message}"
    signer = ctx.trust.keyring.signer
    if ctx.clock.now() >= signer.not_after:
        return False, f"not ready: the signing intermediate {signer.authority_id} has expired"
    return True, "ready"
