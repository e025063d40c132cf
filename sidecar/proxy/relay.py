"""The byte pump: two asyncio Protocols ("sides") joined back to back.

A `Side` is one TCP or Unix connection carrying plaintext; a `TlsSide` (`tls_side.py`)
runs TLS itself on top of a plain transport (an `ssl.SSLObject` over memory BIOs), because
asyncio's own TLS transports can neither half-close nor resume sessions. Once
`link(a, b)` joins two sides, every read on one is written straight to the other:

* large reads (256 KiB) straight into one buffer the whole process shares (the sides are
  `BufferedProtocol`s): whatever reads it consumes the bytes before returning (OpenSSL
  encrypts them, or the memory BIO copies the ciphertext in), so the event loop allocates
  and copies nothing per read; decrypted data comes out as one bytes object per TLS record
  and goes out in one `writelines` (one `writev`) per read (bulk connections go further:
  OpenSSL takes their socket and decrypts into one shared buffer, see `tls_socket.py`);
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
from typing import TYPE_CHECKING, Protocol, cast

from sidecar.proxy.peer import Refusal

if TYPE_CHECKING:
    from sidecar.proxy.tls_side import TlsSide

WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024
READ_SIZE = 256 * 1024

# Every read of every side lands here, and is consumed before the next one can happen
# (one thread; get_buffer, the read and buffer_updated run back to back).
READ_BUFFER = memoryview(bytearray(READ_SIZE))


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


class Side(asyncio.BufferedProtocol):
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
        self.pending: list[bytes] = []  # read before the link

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.owner.side_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        peer = self.peer
        if peer is None:
            self.hold(bytes(READ_BUFFER[:nbytes]))
        elif peer.consumes:
            peer.send(READ_BUFFER[:nbytes])
        else:
            peer.send(bytes(READ_BUFFER[:nbytes]))

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

    def hold(self, data: bytes) -> None:
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

    # Whether send() is done with its data when it returns (then a shared buffer may be
    # passed): not here, a transport may keep what it could not write yet.
    consumes = False

    def send(self, data: bytes | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send_all(self, chunks: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.writelines(chunks)

    def is_direct(self) -> bool:
        """Whether OpenSSL runs this side's socket itself (see `tls_side.py`)."""
        return False

    def holds_data(self) -> bool:
        """Whether the transport kept part of what it was given (it may keep a view)."""
        return self.transport is not None and self.transport.get_write_buffer_size() > 0

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
