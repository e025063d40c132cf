"""Follows the CA's Watch stream (trust bundle + revoked serials) and hands every snapshot to
the identity manager, which applies it in its own task.

The stream runs on the agent channel, so it needs the node certificate, and it opens only
after a unary call has succeeded with that certificate (a renewed node certificate is
activated by its first use; one first use at a time). It restarts when the channel is
rebuilt (after a node renewal or a bundle change), and with backoff on the injected clock
when the CA is unreachable.
"""

from __future__ import annotations

import logging
import random

from meshtls.clock import Clock
from meshtls.identity.rotation import Backoff
from sidecar.errors import CAError
from sidecar.identity.ca_client import CAClient
from sidecar.identity.manager import IdentityManager

log = logging.getLogger(__name__)


async def watch_trust(
    manager: IdentityManager,
    client: CAClient,
    clock: Clock,
    *,
    rng: random.Random | None = None,
) -> None:
    """Run until cancelled. Returns early only if the CA does not implement Watch."""
    r = manager.config.renewal
    backoff = Backoff(r.retry_initial_seconds, r.retry_max_seconds, rng=rng)
    while True:
        await manager.has_node.wait()
        await client.wait_confirmed()
        if not manager.has_node.is_set():
            continue
        try:
            async for update in client.watch(manager.trust_version):
                backoff.reset()
                manager.offer_trust_update(update)
        except CAError as exc:
            if exc.reason == "cancelled":
                continue  # the agent channel was rebuilt; follow the new one
            if exc.reason == "unimplemented":
                log.warning("the CA does not support Watch; relying on periodic refresh")
                return
            delay = backoff.next_delay()
            log.info(
                "trust watch interrupted",
                extra={"reason": exc.reason, "error": exc.message, "retry_in_seconds": delay},
            )
            await clock.sleep_until(clock.now() + delay)
        else:
            # The CA ended the stream (shutting down); reconnect after a short pause.
            await clock.sleep_until(clock.now() + backoff.next_delay())
