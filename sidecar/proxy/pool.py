"""A small pool of pre-established upstream connections for one outbound listener.

With `pool_size: N` the listener keeps up to N connections to `connect` with the TLS
handshake done and the server verified, so a new app connection starts relaying at once.
A pooled connection is dropped when the server closes it, when it is older than
`pool_max_idle_seconds`, or when the listener's TLS context changed (rotation): it was
made with the old identity and bundle, and new connections must use the new ones. If the
server reads first the greeting waits in the pooled connection (one read, then it stops
reading) and reaches the app when the connection is taken. Failed connects back off
exponentially (up to 30 s) so an unreachable server is not hammered.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from sidecar.proxy.peer import Peer, Refusal
from sidecar.proxy.relay import Side
from sidecar.proxy.tls_side import TlsSide

if TYPE_CHECKING:
    from sidecar.proxy.outbound import OutboundListener

log = logging.getLogger("sidecar.proxy")

MAX_BACKOFF_SECONDS = 30.0


class PooledUpstream:
    """One pooled connection: the owner of its side until a connection takes it."""

    __slots__ = ("context", "created", "peer", "pool", "side", "timer")

    def __init__(self, pool: UpstreamPool, context: ssl.SSLContext) -> None:
        self.pool = pool
        self.context = context
        self.created = pool.loop.time()
        self.side: TlsSide | None = None
        self.peer: Peer | None = None
        self.timer: asyncio.TimerHandle | None = None

    # -- Owner hooks while parked ----------------------------------------------------

    def side_made(self, side: Side) -> None:
        assert isinstance(side, TlsSide)
        self.side = side
        self.pool.listener.start_tls(side, self.context)

    def handshake_done(self, side: TlsSide) -> None:
        listener = self.pool.listener
        try:
            self.peer = listener.check_server(side)
        except Refusal as refusal:
            self.handshake_failed(side, refusal)
            return
        listener.record_handshake("accepted", resumed=self.peer.resumed)
        self.pool.became_ready(self)

    def handshake_failed(self, side: TlsSide, refusal: Refusal) -> None:
        listener = self.pool.listener
        listener.handshake_refused(side)
        listener.counters.refused(refusal.reason)
        log.warning(
            "outbound listener %s: pooled connection to %s refused: %s",
            listener.name,
            listener.config.connect,
            refusal.message,
            extra={"listener": listener.name, "reason": refusal.reason, "pooled": True},
        )
        side.close()
        self.pool.failed(self)

    def side_eof(self, side: Side) -> None:
        side.close()
        self.pool.discard(self)

    def side_error(self, side: Side, error: Refusal) -> None:
        side.abort()
        self.pool.discard(self)

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        self.pool.discard(self)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.side is not None:
            self.side.close()


class UpstreamPool:
    def __init__(self, listener: OutboundListener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.ready: list[PooledUpstream] = []
        self.connecting: set[PooledUpstream] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.failures = 0
        self.not_before = 0.0
        self.closed = False

    @property
    def ready_count(self) -> int:
        return len(self.ready)

    @property
    def size(self) -> int:
        return self.listener.config.pool_size

    def take(self, context: ssl.SSLContext) -> tuple[TlsSide, Peer] | None:
        """A ready connection made with `context`, or None."""
        while self.ready:
            slot = self.ready.pop()
            side, peer = slot.side, slot.peer
            if slot.context is not context or side is None or peer is None or side.lost:
                slot.close()
                continue
            if slot.timer is not None:
                slot.timer.cancel()
            self.refill()
            return side, peer
        self.refill()
        return None

    def refill(self) -> None:
        if self.closed or self.loop.time() < self.not_before:
            return
        context = self.listener.context()
        if context is None or not self.listener.accepting:
            return
        while len(self.ready) + len(self.connecting) < self.size:
            slot = PooledUpstream(self, context)
            self.connecting.add(slot)
            task = self.loop.create_task(self._connect(slot))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _connect(self, slot: PooledUpstream) -> None:
        target = self.listener.config.connect
        timeout = self.listener.config.limits.handshake_timeout_seconds
        slot.timer = self.loop.call_later(timeout, self._timed_out, slot)
        try:
            await self.loop.create_connection(lambda: TlsSide(slot), target.host, target.port)
        except OSError as exc:
            log.warning(
                "outbound listener %s: cannot pre-establish a connection to %s: %s",
                self.listener.name,
                target,
                exc.strerror or exc,
                extra={"listener": self.listener.name, "pooled": True},
            )
            self.failed(slot)

    def _timed_out(self, slot: PooledUpstream) -> None:
        slot.timer = None
        if slot in self.connecting:
            if slot.side is not None:
                slot.side.abort()
            self.failed(slot)

    def became_ready(self, slot: PooledUpstream) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        self.connecting.discard(slot)
        self.failures = 0
        if self.closed or slot.context is not self.listener.context():
            slot.close()
            return
        self.ready.append(slot)

    def failed(self, slot: PooledUpstream) -> None:
        slot.close()
        self.connecting.discard(slot)
        self.failures += 1
        delay = min(MAX_BACKOFF_SECONDS, 0.1 * 2 ** min(self.failures, 10))
        self.not_before = self.loop.time() + delay

    def discard(self, slot: PooledUpstream) -> None:
        """A pooled connection went away (server closed it, error)."""
        if slot in self.ready:
            self.ready.remove(slot)
        if slot in self.connecting:
            self.failed(slot)
        self.refill()

    def sweep(self, now: float) -> None:
        """Drop connections too old or made with a context no longer current; refill."""
        context = self.listener.context()
        max_idle = self.listener.config.pool_max_idle_seconds
        for slot in list(self.ready):
            if slot.context is not context or now - slot.created >= max_idle:
                self.ready.remove(slot)
                slot.close()
        self.refill()

    def flush(self) -> None:
        for slot in self.ready:
            slot.close()
        self.ready.clear()

    def close(self) -> None:
        self.closed = True
        self.flush()
        for slot in list(self.connecting):
            slot.close()
        self.connecting.clear()
        for task in self.tasks:
            task.cancel()
