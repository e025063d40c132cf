"""What every listener does: bind, admit connections up to its limit, sweep idle and old
connections, record refusals and finished connections, and drain.

A connection over the limit is accepted by the kernel and closed at once (logged and
counted as `connection_limit`). The sweeper runs four times per shortest timeout (idle,
max lifetime, handshake): it refuses connections still setting up after the handshake
timeout (so the timeout holds within a quarter of itself) and compares each connection's
byte counters with the last sweep, so neither a connection nor the data path needs a
timer. Draining stops accepting (the listening socket is closed), lets open connections
finish, and closes those still open when the drain timeout ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING

from sidecar.fields import Address
from sidecar.proxy.access_log import (
    AccessRecord,
    access_log,
    log_access,
    log_refusal,
)
from sidecar.proxy.config import InboundConfig, OutboundConfig
from sidecar.proxy.connection import Connection
from sidecar.proxy.metrics import ListenerStats
from sidecar.proxy.peer import Refusal
from sidecar.proxy.relay import Side
from sidecar.proxy.tls import ContextKey

if TYPE_CHECKING:
    from sidecar.proxy.service import ProxyService

log = logging.getLogger("sidecar.proxy")

BACKLOG = 4096
MIN_SWEEP_SECONDS = 0.01
MAX_SWEEP_SECONDS = 5.0


class Listener:
    direction = "listener"

    def __init__(self, config: InboundConfig | OutboundConfig, service: ProxyService) -> None:
        self.config = config
        self.service = service
        self.loop = asyncio.get_running_loop()
        self.active: set[Connection] = set()
        self.server: asyncio.Server | None = None
        self.bound: Address | None = None
        self.accepting = False
        self._sweeper: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.counters = service.metrics.counters(self.name)
        self.context_key = self.key_for(config)

    @property
    def name(self) -> str:
        return self.config.name

    async def start(self) -> None:
        """Bind and accept; OSError (address in use, ...) leaves nothing behind."""
        listen = self.config.listen
        try:
            self.server = await self.loop.create_server(
                self.protocol, listen.host, listen.port, backlog=BACKLOG, reuse_address=True
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"{self.direction} listener {self.name} cannot listen on {listen}: "
                f"{exc.strerror or exc}",
            ) from None
        sock = self.server.sockets[0]
        self.bound = Address(listen.host, sock.getsockname()[1])
        for s in self.server.sockets:
            if s.family in (socket.AF_INET, socket.AF_INET6):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepting = True
        self._sweeper = asyncio.create_task(self._sweep(), name=f"proxy-sweep-{self.name}")
        log.info(
            "%s listener %s listening on %s",
            self.direction,
            self.name,
            self.bound,
            extra={"listener": self.name, "listen": str(self.bound)},
        )

    def protocol(self) -> Side:
        """The protocol of one accepted connection (its downstream side)."""
        raise NotImplementedError

    def key_for(self, config: InboundConfig | OutboundConfig) -> ContextKey:
        """Which TLS context the listener's connections use."""
        raise NotImplementedError

    def context(self) -> ssl.SSLContext | None:
        """The current TLS context of the listener's identity, if the sidecar holds it."""
        return self.service.tls.get(self.context_key)

    def reconfigure(self, config: InboundConfig | OutboundConfig) -> None:
        """New settings for new connections; the bound address stays."""
        self.config = replace(config, listen=self.config.listen)
        self.counters = self.service.metrics.counters(self.name)
        self.context_key = self.key_for(config)

    # -- connections -----------------------------------------------------------------

    def admit(self, conn: Connection) -> bool:
        if not self.accepting:
            conn.refuse(Refusal("connection_limit", "the listener is shutting down"))
            return False
        limit = self.config.limits.max_connections
        if len(self.active) >= limit:
            conn.refuse(
                Refusal(
                    "connection_limit",
                    f"{limit} connections are open on this listener (max_connections)",
                )
            )
            return False
        self.active.add(conn)
        self._idle.clear()
        return True

    def record_refusal(self, conn: Connection, refusal: Refusal) -> None:
        self.counters.refused(refusal.reason)
        log_refusal(self.name, self.direction, conn.client, refusal)

    def record_handshake(self, result: str, *, resumed: bool = False) -> None:
        self.counters.handshake(result, resumed)

    def finish(self, conn: Connection) -> None:
        active = self.active
        active.discard(conn)
        if not active:
            self._idle.set()
        up, down = conn.bytes_upstream(), conn.bytes_downstream()
        result = conn.result or "closed"
        self.counters.closed(result, up, down)
        if conn.went_direct():
            self.counters.direct_tls.inc()
        if access_log.isEnabledFor(logging.INFO):
            log_access(
                AccessRecord(
                    listener=self.name,
                    direction=self.direction,
                    client=conn.client,
                    peer_id=conn.peer_id,
                    bytes_upstream=up,
                    bytes_downstream=down,
                    duration_ms=(self.loop.time() - conn.started) * 1000.0,
                    result=result,
                    reason=conn.reason,
                )
            )

    def stats(self) -> ListenerStats:
        up = down = 0
        for conn in self.active:
            up += conn.bytes_upstream()
            down += conn.bytes_downstream()
        return ListenerStats(self.name, len(self.active), up, down, self.pooled())

    def pooled(self) -> int:
        return 0

    async def _sweep(self) -> None:
        while True:
            limits = self.config.limits
            shortest = min(limits.idle_timeout_seconds, limits.handshake_timeout_seconds)
            if limits.max_lifetime_seconds is not None:
                shortest = min(shortest, limits.max_lifetime_seconds)
            interval = min(max(shortest / 4, MIN_SWEEP_SECONDS), MAX_SWEEP_SECONDS)
            await asyncio.sleep(interval)
            now = self.loop.time()
            for conn in list(self.active):
                conn.check_idle(now, limits.idle_timeout_seconds, limits.max_lifetime_seconds)
            self.sweep_extra(now)

    def sweep_extra(self, now: float) -> None:
        """Hook for periodic work of a kind of listener (the outbound pool)."""

    # -- shutdown --------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.accepting = False
        if self.server is not None:
            self.server.close()

    async def drain(self) -> None:
        """Stop accepting, wait for open connections up to the drain timeout, close."""
        self.stop_accepting()
        wait = self.config.limits.drain_timeout_seconds
        if self.active:
            log.info(
                "%s listener %s draining %d connection(s) for up to %gs",
                self.direction,
                self.name,
                len(self.active),
                wait,
                extra={"listener": self.name, "open": len(self.active)},
            )
            try:
                await asyncio.wait_for(self._idle.wait(), wait)
            except TimeoutError:
                log.warning(
                    "%s listener %s: closing %d connection(s) still open after the drain timeout",
                    self.direction,
                    self.name,
                    len(self.active),
                    extra={"listener": self.name, "open": len(self.active)},
                )
                self.abort_all("drain_timeout")
        await self.close()

    def abort_all(self, result: str) -> None:
        for conn in list(self.active):
            conn.abort(result)

    async def close(self) -> None:
        """Stop accepting and the sweeper at once (open connections are not touched)."""
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
