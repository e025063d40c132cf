"""Follows the CA's Watch stream (trust bundle + revoked serials) and hands every snapshot to
the identity manager, which applies it in its own task; polls instead while the stream is
down.

The stream runs on the agent channel, so it needs the node certificate, and it opens only
after a unary call has succeeded with that certificate (a renewed node certificate is
activated by its first use; one first use at a time). It restarts when the channel is
rebuilt (after a node renewal or a bundle change), and with backoff on the injected clock
when the CA is unreachable.

Fallback: whenever the stream is not established (connecting, backing off, refused by
something between us and the CA, or a CA without Watch), a second task polls
GetTrustBundle and GetCrl every `renewal.trust_poll_seconds` and offers the result the same
way, so a new root or a revocation still arrives within that period. A polled result never
replaces a newer one the stream delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from meshtls.clock import Clock
from meshtls.identity.rotation import Backoff
from sidecar.errors import CAError
from sidecar.identity.ca_client import CAClient
from sidecar.identity.ca_messages import TrustUpdate
from sidecar.identity.manager import IdentityManager

log = logging.getLogger(__name__)


class StreamState:
    """Whether the Watch stream is established right now."""

    def __init__(self) -> None:
        self.up = False
        self._down = asyncio.Event()
        self._down.set()

    def opened(self) -> None:
        self.up = True
        self._down.clear()

    def closed(self) -> None:
        self.up = False
        self._down.set()

    async def wait_down(self) -> None:
        await self._down.wait()


async def watch_trust(
    manager: IdentityManager,
    client: CAClient,
    clock: Clock,
    *,
    rng: random.Random | None = None,
) -> None:
    """Run until cancelled: the stream, and the poll that covers for it while it is down."""
    stream = StreamState()
    poller = asyncio.create_task(poll_while_down(manager, client, clock, stream), name="trust-poll")
    try:
        await follow_stream(manager, client, clock, stream, rng=rng)
        await poller  # the CA has no Watch: polling is all there is
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


async def follow_stream(
    manager: IdentityManager,
    client: CAClient,
    clock: Clock,
    stream: StreamState,
    *,
    rng: random.Random | None = None,
) -> None:
    """Keep a Watch stream open; returns only if the CA does not implement Watch."""
    r = manager.config.renewal
    backoff = Backoff(r.retry_initial_seconds, r.retry_max_seconds, rng=rng)
    while True:
        await manager.has_node.wait()
        await client.wait_confirmed()
        if not manager.has_node.is_set():
            continue
        try:
            async for update in client.watch(manager.trust_version, on_open=stream.opened):
                backoff.reset()
                manager.offer_trust_update(update)
        except CAError as exc:
            stream.closed()
            if exc.reason == "cancelled":
                continue  # the agent channel was rebuilt; follow the new one
            if exc.reason == "unimplemented":
                log.warning(
                    "the CA does not support Watch; polling the trust bundle and the "
                    "revocation list instead",
                    extra={"poll_seconds": r.trust_poll_seconds},
                )
                return
            delay = backoff.next_delay()
            log.info(
                "trust watch interrupted; polling until it is back",
                extra={"reason": exc.reason, "error": exc.message, "retry_in_seconds": delay},
            )
            await clock.sleep_until(clock.now() + delay)
        else:
            # The CA ended the stream (shutting down); reconnect after a short pause.
            stream.closed()
            await clock.sleep_until(clock.now() + backoff.next_delay())
        finally:
            stream.closed()


async def fetch_trust(client: CAClient) -> TrustUpdate:
    """The bundle and the revocation list by two unary calls, as one update. Its version
    is the older of the two answers', so a resumed stream still sends anything newer."""
    bundle = await client.trust_bundle()
    revocations = await client.revocations()
    return TrustUpdate(min(bundle.version, revocations.version), bundle, revocations.serials)


async def poll_while_down(
    manager: IdentityManager, client: CAClient, clock: Clock, stream: StreamState
) -> None:
    """Every `renewal.trust_poll_seconds` while the stream is down, fetch and offer the
    trust state. Failures are left to the manager's own calls to report."""
    period = manager.config.renewal.trust_poll_seconds
    while True:
        await stream.wait_down()
        await manager.has_node.wait()
        await client.wait_confirmed()
        if stream.up or not manager.has_node.is_set():
            continue
        try:
            update = await fetch_trust(client)
        except CAError as exc:
            log.debug("trust poll failed", extra={"reason": exc.reason, "error": exc.message})
        else:
            newer = update.version > manager.trust_version
            if manager.offer_trust_update(update, polled=True) and newer:
                log.info(
                    "trust state polled while the watch stream is down",
                    extra={"version": update.version, "revoked": len(update.revoked)},
                )
        await clock.sleep_until(clock.now() + period)
