"""The TLS side of a proxied connection: TLS run by the proxy itself (an `ssl.SSLObject`
over memory BIOs) on top of a plain transport, because asyncio's own TLS transports can
neither half-close nor resume sessions (see `relay.py` for how sides are joined).

* Handshake: the server waits for the client's hello (`start_tls`); the client sends it at
  once (`connect_tls`), offering one of its listener's session tickets (`sessions.py`).
  A finished handshake goes to the owner (policy checks), a failed one with its reason.
  The client's Finished goes out with the first data that waited for the handshake; a
  TLS 1.3 server's session ticket goes out with its first data (or at the end), so neither
  costs a write of its own.
* Tickets: a client collects the one the server sends; a server (with the native helpers)
  drops a resumed session from its cache once the handshake is done, so that each ticket
  is good for one resumption.
* Reading: the ciphertext read goes into the incoming BIO; the plaintext comes out one
  record (one bytes object) at a time and goes to the other side in one call.
* Ending: our direction ends with close_notify then a TCP FIN (`send_eof`); the peer's
  close_notify, or a TCP FIN without one, ends its direction.
* Bulk data: once a relaying connection has carried `DIRECT_AFTER` bytes and reads come
  in large (`DIRECT_READ`), OpenSSL takes over its socket (`native_io.py`,
  `tls_socket.py`): the memory BIOs and their copies leave the data path. Short
  connections and small messages never switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from typing import Any

from sidecar.proxy import native_io
from sidecar.proxy.native_io import NativeIo, SwitchError
from sidecar.proxy.native_tls import NativeSession, NativeTls, NativeTlsError
from sidecar.proxy.peer import Refusal, refusal_from_ssl_error
from sidecar.proxy.relay import READ_BUFFER, Owner, Side, pause
from sidecar.proxy.sessions import Offer, TicketStore
from sidecar.proxy.tls_socket import DirectTls

TLS_RECORD_PLAINTEXT = 16384  # the most one TLS record carries (RFC 8446 5.1)
# A relaying connection hands its socket to OpenSSL once it has carried DIRECT_AFTER bytes
# (both ways) and a single read brought DIRECT_READ: bulk data, where the copies through
# the memory BIOs cost most. Small messages stay on them, which suit them better (no
# exception per read, writes coalesced, no call through ctypes).
DIRECT_AFTER = 256 * 1024
DIRECT_READ = 64 * 1024


class _Detached(asyncio.Protocol):
    """What the transport a side left behind reports to: nothing more to do."""


class TlsSide(Side):
    """A TLS connection: `start_tls` (server) waits for the hello, `connect_tls` (client)
    sends it."""

    __slots__ = (
        "direct",
        "handshaking",
        "incoming",
        "io",
        "native",
        "offer",
        "outgoing",
        "resumed",
        "server_side",
        "sslobj",
        "switching",
        "ticket_held",
        "tickets",
    )

    def __init__(self, owner: Owner) -> None:
        super().__init__(owner)
        self.sslobj: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.handshaking = False
        self.server_side = False
        self.ticket_held = False  # server side: a session ticket waits for the first data
        # Server side: the native helpers, and the cached session the client resumes (None
        # until its hello is read, or when it runs a full handshake).
        self.native: NativeTls | None = None
        self.resumed: NativeSession | None = None
        # Client side: the listener's tickets, and what this connection offered until the
        # server's new ticket has been collected.
        self.tickets: TicketStore | None = None
        self.offer: Offer | None = None
        # The socket helpers (None: memory BIOs only), and the data path once switched.
        self.io: NativeIo | None = None
        self.direct: DirectTls | None = None
        self.switching = False

    def start_tls(self, context: ssl.SSLContext, native: NativeTls | None) -> None:
        """Server side: wait for the client's hello. With `native`, a session the client
        resumes leaves the cache once the handshake is done: tickets are single-use."""
        self.server_side = True
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshaking = True
        self.native = native
        self.io = native_io.load(native)

    def connect_tls(
        self,
        context: ssl.SSLContext,
        tickets: TicketStore,
        server_hostname: str | None,
        native: NativeTls | None = None,
    ) -> None:
        """Client side: send the hello, resuming with one of `tickets` if there is one."""
        self.server_side = False
        self.io = native_io.load(native)
        self.tickets = tickets
        self.sslobj, self.offer = tickets.wrap(
            context, self.incoming, self.outgoing, server_hostname
        )
        self.handshaking = True
        self._handshake()

    def is_direct(self) -> bool:
        return self.direct is not None

    @property
    def offered_ticket(self) -> bool:
        return self.offer is not None and self.offer.offered

    # -- asyncio.Protocol ------------------------------------------------------------

    consumes = True  # OpenSSL encrypts what send() gets before it returns

    def buffer_updated(self, nbytes: int) -> None:
        if self.sslobj is None or self.transport is None or self.transport.is_closing():
            return
        self.incoming.write(READ_BUFFER[:nbytes])
        if self.handshaking:
            self._handshake()
            if self.handshaking or self.transport.is_closing():
                return
        self._decrypt()
        if nbytes >= DIRECT_READ and self.io is not None and not self.switching:
            self._maybe_switch()

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
        self.ticket_held = False
        if self.outgoing.pending and self.transport is not None:
            self.transport.write(self.outgoing.read())

    def _handshake(self) -> None:
        assert self.sslobj is not None
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            if self.native is not None and self.resumed is None and self.server_side:
                self._note_resumption()
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
        if self.resumed is not None and self.native is not None:
            self._retire_ticket()
        if self.server_side:
            # TLS 1.3: what is left to send is the session ticket; it goes out with the
            # first data (or the end) instead of in a write of its own.
            self.ticket_held = self.sslobj.version() == "TLSv1.3"
            if not self.ticket_held:
                self._flush()
            self.owner.handshake_done(self)
            return
        if self.offer is not None:
            assert self.tickets is not None
            self.tickets.handshake_done(self.sslobj, self.offer)
        self.owner.handshake_done(self)
        # Our Finished; usually gone already, in one write with the data that waited.
        self._flush()

    def _note_resumption(self) -> None:
        assert self.native is not None
        assert self.sslobj is not None
        try:
            # None until the client's hello is read (or when it does not resume).
            self.resumed = self.native.resumed_session(self.sslobj)
        except NativeTlsError:
            self.native = None

    def _retire_ticket(self) -> None:
        assert self.native is not None
        assert self.sslobj is not None
        assert self.resumed is not None
        with contextlib.suppress(NativeTlsError):
            self.native.retire(self.sslobj, self.resumed)
        self.resumed = None

    def _decrypt(self) -> None:
        sslobj = self.sslobj
        assert sslobj is not None
        # The C object under the SSLObject: its read() and pending() without a Python
        # wrapper frame each (this runs for every read).
        raw: Any = sslobj._sslobj  # type: ignore[attr-defined]
        incoming = self.incoming
        chunks: list[bytes] = []
        size = 0
        eof = False
        error: ssl.SSLError | None = None
        try:
            # One record per read(); stop when nothing is left rather than on an
            # exception (raising SSLWantReadError costs more than a small record).
            while incoming.pending or raw.pending():
                data = raw.read(TLS_RECORD_PLAINTEXT)
                if not data:
                    eof = True
                    break
                chunks.append(data)
                size += len(data)
        except ssl.SSLWantReadError:
            pass  # a partial record: the rest comes with the next read
        except ssl.SSLZeroReturnError:
            eof = True
        except ssl.SSLError as exc:
            error = exc
        if chunks:
            self._deliver(chunks, size)
        if self.outgoing.pending and not self.ticket_held:
            self._flush()  # what reading made OpenSSL answer (e.g. a key update)
        self.after_read()
        if error is not None:
            self.owner.side_error(self, refusal_from_ssl_error(error, server_side=self.server_side))
        elif eof:
            self.ended()

    def after_read(self) -> None:
        """Client side: keep the ticket the server sends after the handshake."""
        if self.offer is not None and not self.handshaking:
            assert self.tickets is not None
            assert self.sslobj is not None
            if self.tickets.collect(self.sslobj, self.offer):
                self.offer = None

    # -- handing the socket to OpenSSL ---------------------------------------------------

    def _maybe_switch(self) -> None:
        peer = self.peer
        if peer is not None and self.received + peer.received >= DIRECT_AFTER:
            # Not from inside the transport's own callback: on the next turn of the loop.
            self.switching = True
            asyncio.get_running_loop().call_soon(self._switch)

    def _switch(self) -> None:
        """Give the socket to OpenSSL, if everything before is out and nothing waits."""
        self.switching = False
        io, transport, sslobj = self.io, self.transport, self.sslobj
        if (
            io is None
            or sslobj is None
            or self.direct is not None
            or transport is None
            or transport.is_closing()
            or self.handshaking
            or self.peer is None
            or (self.eof_in and self.eof_out)
        ):
            return
        if self.outgoing.pending:
            self._flush()  # a session ticket held back for the first data, say
        if transport.get_write_buffer_size() or self.incoming.pending:
            return  # ciphertext still queued: another time
        found = transport.get_extra_info("socket")
        if found is None:
            self.io = None
            return
        try:
            sock = socket.socket(fileno=os.dup(found.fileno()))
        except OSError:
            self.io = None
            return
        try:
            bios = io.attach(sslobj, self.incoming, self.outgoing, sock.fileno())
        except SwitchError as exc:
            sock.close()
            native_io.disable(io.native, str(exc))
            self.io = None
            self.abort()
            return
        except NativeTlsError as exc:
            sock.close()
            native_io.disable(io.native, str(exc))
            self.io = None
            return
        sock.setblocking(False)
        reading = transport.is_reading()
        # The transport lets go: it closes its descriptor, ours keeps the connection.
        transport.set_protocol(_Detached())
        transport.abort()
        self.direct = DirectTls(
            asyncio.get_running_loop(),
            self,
            sock,
            io,
            bios,
            sslobj,
            reading=reading,
            ended=(self.eof_in, self.eof_out),
        )
        self.transport = self.direct

    def _deliver(self, chunks: list[bytes], size: int) -> None:
        self.received += size
        peer = self.peer
        if peer is None:
            self.pending += chunks
            pause(self.transport)
        elif len(chunks) == 1:
            peer.send(chunks[0])
        else:
            peer.send_all(chunks)

    # -- used by the other side and the owner ---------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        direct = self.direct
        if direct is not None:
            direct.write(data)
            return
        sslobj = self.sslobj
        assert sslobj is not None
        assert self.transport is not None
        try:
            sslobj._sslobj.write(data)  # type: ignore[attr-defined]  # SSLObject.write's own call
        except ssl.SSLError as exc:
            self.owner.side_error(self, refusal_from_ssl_error(exc, server_side=self.server_side))
            return
        self.ticket_held = False
        self.transport.write(self.outgoing.read())
        if len(data) >= DIRECT_READ and self.io is not None and not self.switching:
            self._maybe_switch()

    def send_all(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.send(chunk)

    def send_eof(self) -> None:
        transport = self.transport
        if self.eof_out or transport is None or transport.is_closing():
            return
        self.eof_out = True
        if self.direct is not None:
            self.direct.write_eof()
            return
        if self.sslobj is not None and not self.handshaking:
            with contextlib.suppress(ssl.SSLError):
                self.sslobj.unwrap()  # close_notify; the peer's direction stays open
            self._flush()
        transport.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send_eof()
            self.transport.close()
