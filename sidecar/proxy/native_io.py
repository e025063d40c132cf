"""Hand a connection's socket to OpenSSL (ctypes, guarded): after the handshake, a TLS
connection that carries bulk data stops going through Python's memory BIOs and OpenSSL
reads and writes the socket itself (`tls_socket.py` drives it from the event loop).

Per byte this saves what the memory BIOs cost: on the way in, the copy into the incoming
BIO and out of it again; on the way out, the copy into the outgoing BIO (after zeroing its
buffer as it grows) and out again into a bytes object, plus the allocations.

How a connection is switched (`attach`), on an `ssl.SSLObject` whose handshake is done and
whose memory BIOs are both empty:

* read side: a buffering BIO (`BIO_f_buffer`, `READ_BUFFER` bytes) over a socket BIO, so
  that one `read()` takes many records at once instead of two reads per record;
* write side: a buffering BIO (`WRITE_BUFFER` bytes) over a socket BIO, flushed after each
  batch (`flush`): the records of one batch leave in one `write()`;
* the socket BIOs do not own the descriptor (`BIO_NOCLOSE`): the caller's socket does;
* `SSL_OP_IGNORE_UNEXPECTED_EOF`: a TCP FIN without close_notify ends the peer's direction
  and leaves the connection usable for ours, as on the memory-BIO path (where a FIN never
  reaches OpenSSL).

Checked before anything changes: the SSL object's current BIOs must be the very memory
BIOs Python reports (read through the `MemoryBIO` object, like `native_tls.py` reads
contexts), and after the switch OpenSSL must report the new ones. A failed check raises
`NativeTlsError`: the connection stays on memory BIOs.

The socket is closed by its owner only after the last OpenSSL call on it (the descriptor
number could be reused at once). `close_notify` calls `SSL_shutdown` once: Python's
`unwrap()` calls it a second time, which reads from the socket and would throw away the
peer's data that follows (TLS 1.3 lets the peer go on sending after our close_notify).

`MESHTLS_DIRECT_TLS=off` keeps every connection on the memory BIOs (as does
`MESHTLS_NATIVE_TLS=off`).
"""

from __future__ import annotations

import _ssl
import ctypes
import errno
import logging
import os
import ssl
import weakref
from collections.abc import Callable
from ctypes import c_int, c_long, c_uint64, c_void_p
from typing import Any

from sidecar.proxy.native_tls import NativeTls, NativeTlsError, _read_ptr

log = logging.getLogger("sidecar.proxy")

ENV = "MESHTLS_DIRECT_TLS"
READ_BUFFER = 128 * 1024  # the buffering BIO under OpenSSL's reads
WRITE_BUFFER = 320 * 1024  # one batch (256 KiB of plaintext) of records, with room to spare

_BIO_NOCLOSE = 0
_BIO_CTRL_PENDING = 10
_BIO_CTRL_FLUSH = 11
_BIO_CTRL_WPENDING = 13
_BIO_C_SET_BUFF_SIZE = 117
_BIO_FLAGS_SHOULD_RETRY = 0x08
_SSL_ERROR_WANT_WRITE = 3
_OP_IGNORE_UNEXPECTED_EOF = int(ssl.OP_IGNORE_UNEXPECTED_EOF)


class SwitchError(NativeTlsError):
    """OpenSSL took the new BIOs but does not report them: the connection cannot go on."""


class SocketBios:
    """The BIO chains of one switched connection (freed by OpenSSL with the connection)."""

    __slots__ = ("read", "ssl", "write")

    def __init__(self, ssl_ptr: int, read: int, write: int) -> None:
        self.ssl = ssl_ptr
        self.read = read
        self.write = write


class NativeIo:
    """The OpenSSL calls that put a connection on its socket, bound to `native`'s libssl."""

    def __init__(self, native: NativeTls) -> None:
        self.native = native
        lib = ctypes.CDLL(_ssl.__file__)
        # The flush reports the OS error of a failed write: errno must survive the call.
        lib_errno = ctypes.CDLL(_ssl.__file__, use_errno=True)

        def bind(
            name: str, args: list[type], res: type | None, source: ctypes.CDLL = lib
        ) -> Callable[..., Any]:
            fn = getattr(source, name)
            fn.argtypes = args
            fn.restype = res
            return fn  # type: ignore[no-any-return]

        self._new_socket = bind("BIO_new_socket", [c_int, c_int], c_void_p)
        self._f_buffer = bind("BIO_f_buffer", [], c_void_p)
        self._new = bind("BIO_new", [c_void_p], c_void_p)
        self._push = bind("BIO_push", [c_void_p, c_void_p], c_void_p)
        self._free_all = bind("BIO_free_all", [c_void_p], None)
        self._int_ctrl = bind("BIO_int_ctrl", [c_void_p, c_int, c_long, c_int], c_long)
        self._ctrl = bind("BIO_ctrl", [c_void_p, c_int, c_long, c_void_p], c_long)
        self._flush_ctrl = bind("BIO_ctrl", [c_void_p, c_int, c_long, c_void_p], c_long, lib_errno)
        self._test_flags = bind("BIO_test_flags", [c_void_p, c_int], c_int)
        self._get_rbio = bind("SSL_get_rbio", [c_void_p], c_void_p)
        self._get_wbio = bind("SSL_get_wbio", [c_void_p], c_void_p)
        self._set_bio = bind("SSL_set_bio", [c_void_p, c_void_p, c_void_p], None)
        self._set_options = bind("SSL_set_options", [c_void_p, c_uint64], c_uint64)
        self._in_init = bind("SSL_in_init", [c_void_p], c_int)
        self._has_pending = bind("SSL_has_pending", [c_void_p], c_int)
        self._shutdown = bind("SSL_shutdown", [c_void_p], c_int)
        self._get_error = bind("SSL_get_error", [c_void_p, c_int], c_int)
        self._clear_errors = bind("ERR_clear_error", [], None)

    def _memory_bio(self, bio: ssl.MemoryBIO) -> int:
        # PySSLMemoryBIO: the BIO* right after the object header.
        if not isinstance(bio, _ssl.MemoryBIO):
            raise NativeTlsError(f"not a memory BIO: {type(bio).__name__}")
        return _read_ptr(id(bio) + self.native._head)

    def attach(
        self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, fd: int
    ) -> SocketBios:
        """Move `sslobj` from its (empty) memory BIOs to the socket `fd`."""
        ptr = self.native.ssl_pointer(sslobj)
        if self._in_init(ptr):
            raise NativeTlsError("the handshake is not done")
        if incoming.pending or outgoing.pending or sslobj.pending():
            raise NativeTlsError("the memory BIOs still hold data")
        rbio, wbio = self._get_rbio(ptr), self._get_wbio(ptr)
        if rbio != self._memory_bio(incoming) or wbio != self._memory_bio(outgoing):
            raise NativeTlsError("the connection's BIOs are not the memory BIOs Python reports")
        read = self._chain(fd, READ_BUFFER, 0)
        write = self._chain(fd, WRITE_BUFFER, 1)
        if not read or not write:
            for bio in (read, write):
                if bio:
                    self._free_all(bio)
            raise NativeTlsError("OpenSSL could not make the socket BIOs")
        self._set_bio(ptr, read, write)  # takes both; drops its references to the old ones
        if self._get_rbio(ptr) != read or self._get_wbio(ptr) != write:
            raise SwitchError("OpenSSL does not report the socket BIOs after the switch")
        self._set_options(ptr, _OP_IGNORE_UNEXPECTED_EOF)
        return SocketBios(ptr, read, write)

    def _chain(self, fd: int, size: int, which: int) -> int:
        """A buffering BIO of `size` bytes (0: its read buffer, 1: its write buffer) over a
        socket BIO on `fd`; 0 if OpenSSL fails."""
        sock = self._new_socket(fd, _BIO_NOCLOSE)
        if not sock:
            return 0
        buffer = self._new(self._f_buffer())
        if not buffer:
            self._free_all(sock)
            return 0
        if self._int_ctrl(buffer, _BIO_C_SET_BUFF_SIZE, size, which) != 1:
            self._free_all(buffer)
            self._free_all(sock)
            return 0
        return self._push(buffer, sock) or 0

    def flush(self, bios: SocketBios) -> bool:
        """Write out what the write buffer holds: True when all went, False when the socket
        would block (try again once writable); OSError when the connection failed."""
        if self._flush_ctrl(bios.write, _BIO_CTRL_FLUSH, 0, None) > 0:
            return True
        if self._test_flags(bios.write, _BIO_FLAGS_SHOULD_RETRY):
            return False
        code = ctypes.get_errno() or errno.EPIPE
        raise OSError(code, os.strerror(code))

    def unsent(self, bios: SocketBios) -> int:
        """Bytes waiting in the write buffer."""
        return int(self._ctrl(bios.write, _BIO_CTRL_WPENDING, 0, None))

    def buffered(self, bios: SocketBios) -> bool:
        """Whether OpenSSL holds received bytes not yet read (a read would not need the
        socket)."""
        return bool(
            self._has_pending(bios.ssl) or self._ctrl(bios.read, _BIO_CTRL_PENDING, 0, None)
        )

    def close_notify(self, bios: SocketBios) -> bool:
        """Send close_notify (once), into the write buffer; False when it must be tried
        again once the socket is writable. Other failures are ignored: the TCP FIN that
        follows still ends our direction."""
        ret = self._shutdown(bios.ssl)
        if ret >= 0:
            return True
        want_write = self._get_error(bios.ssl, ret) == _SSL_ERROR_WANT_WRITE
        self._clear_errors()
        return not want_write


# Per NativeTls object (tests make several): the helpers, or None once turned off.
_loaded: weakref.WeakKeyDictionary[NativeTls, NativeIo | None] = weakref.WeakKeyDictionary()


def load(native: NativeTls | None) -> NativeIo | None:
    """The socket helpers for `native`, or None (off, or unusable here: logged once)."""
    if native is None:
        return None
    if native in _loaded:
        return _loaded[native]
    io: NativeIo | None = None
    if os.environ.get(ENV, "on").strip().lower() in ("off", "0", "false", "no"):
        log.info("TLS stays on memory buffers (%s)", ENV, extra={"direct_tls": False})
    else:
        try:
            io = NativeIo(native)
        except (AttributeError, OSError) as exc:
            log.warning(
                "TLS stays on memory buffers (OpenSSL's socket functions are missing): %s",
                exc,
                extra={"direct_tls": False, "error": str(exc)},
            )
    _loaded[native] = io
    return io


def disable(native: NativeTls | None, reason: str) -> None:
    """A check failed on a connection: no more switches in this process."""
    if native is not None and _loaded.get(native) is not None:
        log.warning(
            "TLS stays on memory buffers from now on: %s",
            reason,
            extra={"direct_tls": False, "error": reason},
        )
        _loaded[native] = None
