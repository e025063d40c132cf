"""`DirectTls`: the data path of a TLS side once OpenSSL reads and writes the socket itself
(`native_io.py`), driven from the event loop with `add_reader`/`add_writer` on our own
non-blocking socket. It stands in for the side's transport (same calls: pause/resume
reading, close, abort, extra info) and reports to the side like a transport reports to
its protocol (`pause_writing`, `resume_writing`, `connection_lost`).

* Reading: when the socket is readable, records are decrypted one after another straight
  into one buffer the whole process shares (`_Plain`), up to 256 KiB, and each full buffer
  goes to the other side in one write, as a memoryview: no bytes object per record. If
  the other side's transport keeps part of it (its socket is full), the buffer is left to
  it and a new one is made. Reading stops when OpenSSL wants more from the socket, when
  the other side pauses us (back-pressure), or at the end of the peer's direction (its
  close_notify or a TCP FIN); after a pause, what OpenSSL already holds is read at once
  when reading resumes (the socket may not signal it again).
* Writing: plaintext goes through `SSL_write` into OpenSSL's write buffer, which goes out
  in one `write()` per batch. When the socket is full, what OpenSSL did not take is kept
  (a copy) and the other side stops reading (`pause_writing`) until everything is out:
  nothing is buffered without bound.
* Ending our direction: close_notify, then `shutdown(SHUT_WR)` (both after the data
  before them). Closing flushes first; aborting does not.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from typing import TYPE_CHECKING, Any

from sidecar.proxy.native_io import NativeIo, SocketBios
from sidecar.proxy.peer import refusal_from_ssl_error

if TYPE_CHECKING:
    from sidecar.proxy.tls_side import TlsSide

PLAIN_SIZE = 256 * 1024  # decrypted bytes handed on per write
# Full buffers one readable event may hand on before the loop turns: a fast bulk sender
# must not keep the other connections of the process waiting.
BATCHES_PER_WAKEUP = 4
RECORD = 16384  # the most plaintext one TLS record carries


def _broken(exc: Exception) -> bool:
    """The connection itself failed (reset, broken pipe), not TLS: OpenSSL on a socket
    reports that as an EOF or a syscall error."""
    return not isinstance(exc, ssl.SSLError) or isinstance(
        exc, ssl.SSLEOFError | ssl.SSLSyscallError
    )


class _Plain:
    """The decrypt buffer every direct side shares (one thread: filled and handed on
    before anything else runs), replaced when a transport keeps a view of it."""

    view = memoryview(bytearray(PLAIN_SIZE))

    @classmethod
    def retire(cls) -> None:
        cls.view = memoryview(bytearray(PLAIN_SIZE))


class DirectTls(asyncio.Transport):
    """A TLS connection on its own socket, OpenSSL doing the I/O."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        side: TlsSide,
        sock: socket.socket,
        io: NativeIo,
        bios: SocketBios,
        sslobj: ssl.SSLObject,
        *,
        reading: bool,
        ended: tuple[bool, bool] = (False, False),
    ) -> None:
        """`ended`: whether the peer's direction and ours have ended already."""
        super().__init__()
        self._loop = loop
        self._side = side
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._io = io
        self._bios = bios
        self._raw: Any = sslobj._sslobj  # type: ignore[attr-defined]  # SSLObject's C object
        self._server_side = side.server_side
        self._reading = False
        self._writing = False  # waiting for the socket to become writable
        self._queue: collections.deque[bytes] = collections.deque()  # not taken by OpenSSL yet
        self._read_wants_write = False
        self._eof_in = ended[0]  # the peer's direction ended: no more reading
        self._eof_pending = ended[1]  # our direction ends (or has ended) once the queue is out
        self._close_pending = False  # close once the queue is out
        self._closing = False
        if reading:
            self.resume_reading()

    # -- transport API used by the relay -----------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._reading or self._closing or self._eof_in:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._on_readable)
        if self._io.buffered(self._bios):
            self._loop.call_soon(self._on_readable)  # the socket will not say so again

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if sock is None:
            return default
        try:
            if name == "peername":
                return sock.getpeername()
            if name == "sockname":
                return sock.getsockname()
        except OSError:
            return default
        if name == "socket":
            return sock
        return default

    def get_write_buffer_size(self) -> int:
        unsent = 0 if self._sock is None else self._io.unsent(self._bios)
        return unsent + sum(map(len, self._queue))

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """Flush what is queued, then close."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if self._writing:
            self._close_pending = True
        else:
            self._finish(None)

    def abort(self) -> None:
        if self._sock is None:
            return
        self._closing = True
        self._finish(None)

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send plaintext (what OpenSSL cannot take now is copied and kept)."""
        if self._sock is None or self._eof_pending:
            return
        if self._writing:
            self._queue.append(bytes(data))
            return
        try:
            self._raw.write(data)
        except ssl.SSLWantWriteError:
            self._queue.append(bytes(data))  # to be offered again, the same bytes
            self._blocked()
            return
        except (ssl.SSLError, OSError) as exc:
            self._write_failed(exc)
            return
        self._flush()

    def write_eof(self) -> None:
        """close_notify, then a TCP FIN; after what is queued."""
        if self._sock is None or self._eof_pending:
            return
        self._eof_pending = True
        if not self._writing:
            self._end_direction()

    def _flush(self) -> bool:
        try:
            if self._io.flush(self._bios):
                return True
        except OSError as exc:
            self._finish(exc)
            return False
        self._blocked()
        return False

    def _end_direction(self) -> None:
        if not self._io.close_notify(self._bios):
            self._blocked()
            return
        if not self._flush():
            return
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._finish(exc)

    def _blocked(self) -> None:
        if self._writing or self._sock is None:
            return
        self._writing = True
        self._loop.add_writer(self._fd, self._on_writable)
        self._side.pause_writing()

    def _on_writable(self) -> None:
        queue = self._queue
        try:
            while queue:
                self._raw.write(queue[0])  # the first may be a write OpenSSL began
                queue.popleft()
            if not self._io.flush(self._bios):
                return
        except ssl.SSLWantWriteError:
            return
        except (ssl.SSLError, OSError) as exc:
            self._write_failed(exc)
            return
        self._writing = False
        self._loop.remove_writer(self._fd)
        if self._read_wants_write:
            self._read_wants_write = False
            self._loop.call_soon(self._on_readable)
        if self._eof_pending:
            self._end_direction()
            if self._writing or self._sock is None:
                return
        if self._close_pending:
            self._finish(None)
            return
        self._side.resume_writing()

    def _write_failed(self, exc: Exception) -> None:
        if _broken(exc):
            self._finish(ConnectionResetError(f"the connection broke while sending: {exc}"))
            return
        assert isinstance(exc, ssl.SSLError)
        self._side.owner.side_error(
            self._side, refusal_from_ssl_error(exc, server_side=self._server_side)
        )

    # -- reading -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if not self._reading or self._sock is None:
            return
        read = self._raw.read
        buf = _Plain.view
        limit = PLAIN_SIZE - RECORD
        n = 0
        batches = 0
        eof = False
        failure: Exception | None = None
        try:
            while True:
                got = read(RECORD, buf[n:])
                if not got:
                    eof = True
                    break
                n += got
                if n > limit:
                    self._deliver(buf, n)
                    n = 0
                    buf = _Plain.view
                    batches += 1
                    if not self._reading:
                        break  # paused by the other side, or closed
                    if batches == BATCHES_PER_WAKEUP:
                        if self._io.buffered(self._bios):
                            # The socket will not signal what OpenSSL already holds.
                            self._loop.call_soon(self._on_readable)
                        break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except ssl.SSLWantWriteError:
            self._read_wants_write = True  # e.g. a key update to answer: once writable
            self._blocked()
        except (ssl.SSLError, OSError) as exc:
            failure = exc
        if n:
            self._deliver(buf, n)
        side = self._side
        side.after_read()
        if self._sock is not None and not self._writing and self._io.unsent(self._bios):
            self._flush()  # what reading made OpenSSL answer
        if failure is not None:
            if _broken(failure):
                self._finish(ConnectionResetError(f"the connection broke: {failure}"))
            else:
                assert isinstance(failure, ssl.SSLError)
                side.owner.side_error(
                    side, refusal_from_ssl_error(failure, server_side=self._server_side)
                )
        elif eof and not self._eof_in:
            self._eof_in = True
            self.pause_reading()
            side.ended()

    def _deliver(self, buf: memoryview, n: int) -> None:
        side = self._side
        side.received += n
        peer = side.peer
        if peer is None:
            side.pending.append(bytes(buf[:n]))
            self.pause_reading()
            return
        peer.send(buf[:n])
        if not peer.consumes and peer.holds_data():
            _Plain.retire()  # its transport may keep a view of the buffer

    # -- the end ---------------------------------------------------------------------------

    def _finish(self, exc: Exception | None) -> None:
        sock = self._sock
        if sock is None:
            return
        self._closing = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._queue.clear()
        self._sock = None  # no OpenSSL call on this descriptor from here on
        sock.close()
        self._loop.call_soon(self._side.connection_lost, exc)
