"""The scheduled jobs' shared parts: run counting and failure logging, and the expiry
watchdog that warns long before any authority in use expires (silent CA expiry is what
caused the worst mesh outages)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ca_server.authority.rotation import ACTIVATE_AT
from ca_server.domain import Authority
from ca_server.services.context import CAContext
from meshtls.clock import utc

log = logging.getLogger(__name__)

DAY = 86400.0


def instrumented(
    ctx: CAContext, name: str, job: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[None]]:
    """`job`, counted in meshtls_ca_job_runs/failures; a failure is logged, never raised
    (the scheduler runs it again at its next interval)."""

    async def run(*args: Any) -> None:
        ctx.metrics.job_runs.labels(name).inc()
        try:
            await job(*args)
        except Exception:
            ctx.metrics.job_failures.labels(name).inc()
            log.exception("scheduled job failed", extra={"job": name})

    return run


def expiry_warnings(authorities: list[Authority], now: float, upstream_warning: float) -> list[str]:
    """Plain-words warnings for every authority in use that is close to its end.

    An upstream intermediate (the operator rotates it) is flagged `upstream_warning`
    seconds before it expires; our own authorities when they are past the point where
    rotation should already have replaced them (5/6 of their life), which means rotation
    is not happening."""
    warnings = []
    for a in authorities:
        if a.state == "retired":
            continue
        left = a.not_after - now
        when = utc(a.not_after).strftime("%Y-%m-%d %H:%M UTC")
        if left <= 0:
            warnings.append(f"{a.kind} {a.id} EXPIRED at {when}")
        elif a.upstream and a.kind == "intermediate" and left <= upstream_warning:
            warnings.append(
                f"upstream intermediate {a.id} expires in {left / DAY:.1f} days ({when}): "
                "install a new one from your CA (upstream: cert_file/key_file/chain_file)"
            )
        elif not a.upstream and a.state == "active":
            life = a.not_after - a.not_before
            if life > 0 and (now - a.not_before) / life > ACTIVATE_AT + 0.05:
                warnings.append(
                    f"{a.kind} {a.id} expires in {left / 3600:.1f}h and has not been rotated: "
                    "check the rotation job (meshtls_ca_job_failures_total)"
                )
    return warnings


async def watch_expiry(ctx: CAContext, upstream_warning: float) -> list[str]:
    authorities = await ctx.read(lambda tx: tx.list_authorities())
    warnings = expiry_warnings(authorities, ctx.clock.now(), upstream_warning)
    for warning in warnings:
        log.warning("authority expiry: %s", warning, extra={"warning": warning})
    return warnings
