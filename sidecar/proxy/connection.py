"""One proxied connection: its two sides, how it ends, and its record.

A connection is "setting up" from accept until both sides are linked (TLS handshake,
policy, connecting onward), bounded by the listener's handshake timeout (checked by the
listener's sweeper, like the idle timeout: no timer per connection); then it is
"relaying" until both directions have ended (result `ok`) or something stops it (reset,
idle timeout, max lifetime, drain timeout, TLS error). It finishes, and is logged and
counted once, when every side it opened has closed.

The inbound and outbound connections (`inbound.py`, `outbound.py`) fill in what happens
when a side connects and when a handshake completes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sidecar.proxy.access_log import access_log, format_address
from sidecar.proxy.peer import Refusal
from sidecar.proxy.relay import Side, link
from sidecar.proxy.tls_side import TlsSide

if TYPE_CHECKING:
    from sidecar.proxy.listener import Listener


class Connection:
    __slots__ = (
        "client_address",
        "connect_task",
        "down",
        "finished",
        "last_active",
        "last_total",
        "listener",
        "loop",
        "peer_id",
        "reason",
        "relaying",
        "result",
        "setup_timeout",
        "started",
        "up",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.down: Side | None = None  # the side that connected to us
        self.up: Side | None = None  # the side we connected to
        self.started = self.loop.time()
        self.last_active = self.started
        self.last_total = 0
        self.result: str | None = None
        self.reason = ""
        self.peer_id = "-"
        self.client_address: object = None  # as the transport reports it
        self.relaying = False
        self.finished = False
        self.setup_timeout = listener.config.limits.handshake_timeout_seconds
        self.connect_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    def accept(self, side: Side) -> bool:
        """The downstream side connected: admit it or refuse it. True when admitted."""
        self.down = side
        if access_log.isEnabledFor(logging.INFO):  # else looked up only if a refusal needs it
            self.client_address = side.address()
        return self.listener.admit(self)

    @property
    def client(self) -> str:
        """The address of whoever connected to us ("-" once unknown)."""
        down = self.down
        if self.client_address is None and down is not None and not down.lost:
            self.client_address = down.address()
        return format_address(self.client_address)

    def _setup_timed_out(self) -> None:
        self.refuse(
            Refusal(
                "handshake_timeout",
                "the TLS handshake and the onward connection took longer than "
                f"{self.setup_timeout:g}s",
                self.peer_id if self.peer_id != "-" else None,
            )
        )

    def start_relay(self) -> None:
        assert self.down is not None
        assert self.up is not None
        self.relaying = True
        self.last_active = self.loop.time()
        link(self.down, self.up)

    def refuse(self, refusal: Refusal) -> None:
        if self.result is None:
            self.result = "refused"
            self.reason = refusal.reason
            self.listener.record_refusal(self, refusal)
        self.close()

    def connect_failed(self, refusal: Refusal) -> None:
        """The onward connection could not be made. uvloop makes the protocol before it
        connects: a side that never connected is forgotten, or the connection would wait
        for it to close forever (and hold up a drain)."""
        if self.up is not None and self.up.transport is None:
            self.up = None
        self.refuse(refusal)

    def close(self, result: str | None = None, reason: str = "") -> None:
        """End the connection gracefully (buffered data is flushed first)."""
        if self.result is None and result is not None:
            self.result, self.reason = result, reason
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (self.down, self.up):
            if side is not None:
                side.close()
        self._maybe_finish()

    def abort(self, result: str, reason: str = "") -> None:
        if self.result is None:
            self.result, self.reason = result, reason
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (self.down, self.up):
            if side is not None:
                side.abort()
        self._maybe_finish()

    def check_idle(self, now: float, idle: float, lifetime: float | None) -> None:
        """Called by the listener's sweeper: refuse when still setting up after the
        handshake timeout, close when idle or too old."""
        if lifetime is not None and now - self.started >= lifetime:
            self.close("max_lifetime")
            return
        if not self.relaying:
            if now - self.started >= self.setup_timeout and self.result is None:
                self._setup_timed_out()
            return
        assert self.down is not None
        assert self.up is not None
        total = self.down.received + self.up.received
        if total != self.last_total:
            self.last_total = total
            self.last_active = now
        elif now - self.last_active >= idle:
            self.close("idle_timeout", f"no data either way for {idle:g}s")

    def _maybe_finish(self) -> None:
        if self.finished:
            return
        for side in (self.down, self.up):
            if side is not None and not side.lost:
                return
        if self.connect_task is not None and not self.connect_task.done():
            return
        self.finished = True
        self.listener.finish(self)
        # Break the cycles (connection <-> side, side <-> side): reference counting then
        # frees everything at once, and the cyclic GC has nothing to find.
        for side in (self.down, self.up):
            if side is not None:
                side.peer = None
        self.down = self.up = None
        self.connect_task = None

    def _connect_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.abort("error", f"internal error: {task.exception()}")
        self._maybe_finish()

    def went_direct(self) -> bool:
        """Whether a side of this connection handed its socket to OpenSSL."""
        down, up = self.down, self.up
        return (down is not None and down.is_direct()) or (up is not None and up.is_direct())

    def bytes_upstream(self) -> int:
        return 0 if self.down is None else self.down.received

    def bytes_downstream(self) -> int:
        return 0 if self.up is None else self.up.received

    # -- Owner hooks shared by both directions ---------------------------------------

    def side_made(self, side: Side) -> None:
        raise NotImplementedError

    def handshake_done(self, side: TlsSide) -> None:
        raise NotImplementedError

    def handshake_failed(self, side: TlsSide, refusal: Refusal) -> None:
        self.refuse(refusal)

    def side_eof(self, side: Side) -> None:
        down, up = self.down, self.up
        if self.relaying and down is not None and up is not None and down.eof_in and up.eof_in:
            self.close("ok")

    def side_error(self, side: Side, error: Refusal) -> None:
        if error.reason == "peer_refused" and side is self.up and side.received == 0:
            # TLS 1.3: a server checks our certificate after our side of the handshake
            # completed, so its refusal arrives as the first thing we read.
            self.refuse(error)
            return
        self.abort("error", error.message)

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        if self.result is None:
            down, up = self.down, self.up
            if down is not None and up is not None and down.eof_in and up.eof_in:
                self.result = "ok"
            elif exc is not None:
                self.result, self.reason = "reset", str(exc) or type(exc).__name__
            else:
                self.result = "closed"
        for other in (self.down, self.up):
            if other is not None and other is not side:
                other.close()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        self._maybe_finish()
