"""The byte pump: two asyncio Protocols ("sides") joined back to back.

A `Side` is one TCP or Unix connection carrying plaintext; a `TlsSide` runs TLS itself on
top of a plain transport (an `ssl.SSLObject` over memory BIOs), because asyncio's own TLS
transports can neither half-close nor resume sessions. Once `link(a, b)` joins two sides,
every read on one is written straight to the other:

* large reads (the event loop's 256 KiB), one `write` per read; decrypted data goes into a
  fresh buffer per read, so no buffer is ever reused while a transport may still hold it;
* back-pressure: when a side's transport buffer passes its high-water mark, the other
  side stops reading until it drains (`pause_writing`/`resume_writing`); nothing is
  buffered without bound, not even before the link (a side that gets data early keeps one
  read and pauses);
* half-close both ways: a TCP FIN becomes `write_eof()` on the other side; on TLS an EOF
  is sent as close_notify followed by a TCP FIN, and the other direction keeps flowing
  until the peer ends it too (TLS 1.3 allows reading after sending close_notify).

The sides report to an `Owner` (the connection, or a pooled upstream slot), which decides
what a finished handshake, an EOF or a lost connection means.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Protocol, cast

from sidecar.proxy.peer import Refusal, refusal_from_ssl_error

WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024
TLS_RECORD_MAX = 16384 + 2048  # plaintext of one record, with room to spare


class Owner(Protocol):
    def side_made(self, side: Side) -> None: ...

    def handshake_done(self, side: TlsSide) -> None: ...

    def handshake_failed(self, side: TlsSide, refusal: Refusal) -> None: ...

    def side_eof(self, side: Side) -> None: ...

    def side_error(self, side: Side, error: Refusal) -> None: ...

    def side_lost(self, side: Side, exc: Exception | None) -> None: ...


def pause(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None and not transport.is_closing():
        transport.pause_reading()  # type: ignore[attr-defined]


def resume(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None and not transport.is_closing():
        transport.resume_reading()  # type: ignore[attr-defined]


class Side(asyncio.Protocol):
    """A plaintext connection (TCP or Unix)."""

    __slots__ = (
        "eof_in",
        "eof_out",
        "lost",
        "owner",
        "peer",
        "pending",
        "received",
        "transport",
        "write_paused",
    )

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.received = 0  # plaintext bytes that came from this side
        self.eof_in = False  # this side ended its direction
        self.eof_out = False  # we ended the direction towards this side
        self.write_paused = False
        self.lost = False
        self.pending: list[bytes | memoryview] = []  # read before the link

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.owner.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is not None:
            peer.send(data)
        else:
            self.hold(data)

    def eof_received(self) -> bool:
        self.ended()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.peer is not None:
            pause(self.peer.transport)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.peer is not None:
            resume(self.peer.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.owner.side_lost(self, exc)

    # -- used by the other side and the owner ---------------------------------------

    def hold(self, data: bytes | memoryview) -> None:
        """Keep data read before the link, and stop reading until then."""
        self.pending.append(data)
        pause(self.transport)

    def ended(self) -> None:
        """This side ended its direction: pass the EOF on."""
        if self.eof_in:
            return
        self.eof_in = True
        if self.peer is not None:
            self.peer.send_eof()
        self.owner.side_eof(self)

    def send(self, data: bytes | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send_eof(self) -> None:
        transport = self.transport
        if self.eof_out or transport is None or transport.is_closing():
            return
        self.eof_out = True
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def close(self) -> None:
        """Flush what is buffered, then close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def address(self, name: str = "peername") -> object:
        return None if self.transport is None else self.transport.get_extra_info(name)


class TlsSide(Side):
    """A TLS connection; `start_tls` begins the handshake (the client speaks first)."""

    __slots__ = ("handshaking", "incoming", "outgoing", "server_side", "sslobj", "ticket_sink")

    def __init__(self, owner: Owner) -> None:
        super().__init__(owner)
        self.sslobj: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.handshaking = False
        self.server_side = False
        # Called once with the first resumable session the server sends (client side).
        self.ticket_sink: _TicketSink | None = None

    def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.server_side = server_side
        self.sslobj = context.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        self.handshaking = True
        if not server_side:
            self._handshake()

    # -- asyncio.Protocol ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.sslobj is None or self.transport is None or self.transport.is_closing():
            return
        self.incoming.write(data)
        if self.handshaking:
            self._handshake()
            if self.handshaking or self.transport.is_closing():
                return
        self._decrypt()

    def eof_received(self) -> bool:
        if self.handshaking or self.sslobj is None:
            self.handshaking = False
            self.owner.handshake_failed(
                self,
                Refusal(
                    "connection_closed",
                    f"the {'client' if self.server_side else 'server'} closed the connection "
                    "during the TLS handshake",
                ),
            )
            return False
        # A TCP FIN without close_notify: treated as the end of the peer's direction.
        self.ended()
        return True

    # -- TLS ----------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.outgoing.pending and self.transport is not None:
            self.transport.write(self.outgoing.read())

    def _handshake(self) -> None:
        assert self.sslobj is not None
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self.handshaking = False
            self._flush()  # the alert, so the peer learns why
            self.owner.handshake_failed(
                self, refusal_from_ssl_error(exc, server_side=self.server_side)
            )
            return
        self.handshaking = False
        self._flush()
        self.owner.handshake_done(self)

    def _decrypt(self) -> None:
        sslobj = self.sslobj
        assert sslobj is not None
        buf = bytearray(self.incoming.pending + TLS_RECORD_MAX)
        view = memoryview(buf)
        size = len(buf)
        off = 0
        eof = False
        error: ssl.SSLError | None = None
        try:
            while True:
                if off == size:
                    self._deliver(view[:off])
                    buf = bytearray(self.incoming.pending + TLS_RECORD_MAX)
                    view, size, off = memoryview(buf), len(buf), 0
                # With a buffer, read() returns the number of bytes read into it.
                n = cast(int, sslobj.read(size - off, view[off:]))
                if n == 0:
                    eof = True
                    break
                off += n
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except ssl.SSLError as exc:
            error = exc
        if off:
            self._deliver(view[:off])
        if self.outgoing.pending:
            self._flush()
        if self.ticket_sink is not None:
            session = sslobj.session
            if session is not None and session.has_ticket:
                self.ticket_sink.store(sslobj.context, session)
                self.ticket_sink = None
        if error is not None:
            self.owner.side_error(self, refusal_from_ssl_error(error, server_side=self.server_side))
        elif eof:
            self.ended()

    def _deliver(self, data: memoryview) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is not None:
            peer.send(data)
        else:
            self.hold(data)

    # -- used by the other side and the owner ---------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        sslobj = self.sslobj
        assert sslobj is not None
        assert self.transport is not None
        try:
            sslobj.write(data)
        except ssl.SSLError as exc:
            self.owner.side_error(self, refusal_from_ssl_error(exc, server_side=self.server_side))
            return
        self.transport.write(self.outgoing.read())

    def send_eof(self) -> None:
        transport = self.transport
        if self.eof_out or transport is None or transport.is_closing():
            return
        self.eof_out = True
        if self.sslobj is not None and not self.handshaking:
            with contextlib.suppress(ssl.SSLError):
                self.sslobj.unwrap()  # close_notify; the peer's direction stays open
            self._flush()
        transport.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send_eof()
            self.transport.close()


class _TicketSink(Protocol):
    def store(self, context: ssl.SSLContext, session: ssl.SSLSession) -> None: ...


def link(a: Side, b: Side) -> None:
    """Join two sides: flush what each read before, pass on EOFs, start reading."""
    a.peer, b.peer = b, a
    for side, other in ((a, b), (b, a)):
        pending, side.pending = side.pending, []
        for chunk in pending:
            other.send(chunk)
    for side, other in ((a, b), (b, a)):
        if side.eof_in:
            other.send_eof()
    for side, other in ((a, b), (b, a)):
        if not other.write_paused and not side.eof_in:
            resume(side.transport)
