"""What every local API call shares: the identity snapshots it reads, its caller, and the
bookkeeping that lets the server end open streams cleanly when the sidecar stops.

`SnapshotSource` is what the identity manager offers: `subscribe()`.
`CallTracker` counts running calls and hands out subscriptions that `shutdown()` ends, so
that a stream's handler returns UNAVAILABLE (which SPIFFE and xDS clients retry) instead
of being cut off with CANCELLED (which the PyPI spiffe client treats as final).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from sidecar.identity.publisher import Subscription
from sidecar.workload_api.attestation import Caller, attest
from sidecar.workload_api.unixgrpc import PeerCredentialsUnavailable, caller_credentials

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the meshtls sidecar is stopping; reconnect shortly"
SHUTDOWN_GRACE_SECONDS = 2.0


class SnapshotSource(Protocol):
    def subscribe(self) -> Subscription: ...


async def identify(stream: Stream[Any, Any], api: str) -> Caller:
    """Attest the caller of `stream`; PERMISSION_DENIED when the kernel cannot say who."""
    try:
        credentials = caller_credentials(stream)
    except PeerCredentialsUnavailable as exc:
        log.warning("refusing a caller without credentials", extra={"api": api, "error": str(exc)})
        raise GRPCError(Status.PERMISSION_DENIED, f"cannot identify the caller: {exc}") from None
    # Name lookups may go to NSS (LDAP, ...): keep them off the event loop.
    return await asyncio.to_thread(attest, credentials)


class CallTracker:
    """Running calls and their subscriptions, so that a stop ends them all at once."""

    def __init__(self, source: SnapshotSource) -> None:
        self._source = source
        self._subscriptions: set[Subscription] = set()
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.closing = False

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """Wrap a handler: refuse new calls while stopping, count the running ones."""
        if self.closing:
            raise GRPCError(Status.UNAVAILABLE, SHUTDOWN_MESSAGE)
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    @asynccontextmanager
    async def updates(self) -> AsyncIterator[Subscription]:
        """Snapshots (the current one at once, then every change) until shutdown."""
        subscription = self._source.subscribe()
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            subscription.close()
        if self.closing:
            raise GRPCError(Status.UNAVAILABLE, SHUTDOWN_MESSAGE)

    async def shutdown(self) -> None:
        """End every open stream with UNAVAILABLE and wait (a little) for the handlers."""
        self.closing = True
        for subscription in list(self._subscriptions):
            subscription.close()
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE_SECONDS):
                await self._idle.wait()
        except TimeoutError:
            log.warning("calls still running at shutdown", extra={"calls": self._running})
