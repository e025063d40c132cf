"""OpenSSL settings and session handling that Python 3.11's `ssl` module cannot do, made
through OpenSSL's own API (ctypes), guarded so that anything unexpected leaves the defaults.

What it adds:

* TLS 1.3 cipher suites in our order (AES-128-GCM, ChaCha20-Poly1305, AES-256-GCM: all
  AEAD) and key exchange groups X25519 then P-256 (both ECDHE; no finite-field group);
  Python 3.11 can set neither (`set_ecdh_curve` takes one curve, `set_ciphers` only TLS
  1.2 suites);
* cheap TLS sessions: Python's `SSLObject.session` getter and setter both copy a session
  by encoding and decoding it, which re-parses the peer's certificate (about 0.3 ms each
  with OpenSSL 3.0); here a session is taken and offered by pointer (`SSL_SESSION_dup`,
  `SSL_set_session`), microseconds.

How the pointers are found, and checked before anything is written: the C structs of
CPython's `_ssl` module start with the OpenSSL pointer right after the object header
(`PySSLContext.ctx`; `PySSLSocket.ssl` after a `Socket` field, followed by the owning
context object). `load()` checks the type sizes, that OpenSSL's version is the one the
`ssl` module reports, and a probe context and connection: options, verify mode and
minimum version read through OpenSSL must equal what Python reports, and the
connection's SSL_CTX must be the context's. Each context is checked the same way before
it is tuned, and each connection's object must hold its own context object at the
expected place. If any check fails the proxy logs it once and runs on Python's
defaults: P-256 only, OpenSSL's suite order, sessions through Python's copies.

Sessions taken here are private copies (`SSL_SESSION_dup`): OpenSSL marks a session not
resumable when a connection using it is freed without a clean shutdown, which must not
spoil the ticket a listener keeps. A server drops a resumed session from its cache
(`retire`), so that each stateful ticket is good for one resumption.

`MESHTLS_NATIVE_TLS=off` turns all of it off (to compare, or to rule it out).
"""

from __future__ import annotations

import _ssl
import ctypes
import logging
import os
import ssl
import sys
from collections.abc import Callable
from ctypes import c_char_p, c_int, c_long, c_uint64, c_void_p
from typing import Any

log = logging.getLogger("sidecar.proxy")

ENV = "MESHTLS_NATIVE_TLS"
# TLS 1.3 suites, fastest first where AES-NI exists; every one is AEAD.
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
# ECDHE groups only: X25519 (cheapest), then P-256.
GROUPS = "X25519:P-256"

_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_GET_MIN_PROTO_VERSION = 130
_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}
_HEAD = object.__basicsize__  # PyObject_HEAD: where the C fields start
_PTR = ctypes.sizeof(c_void_p)
_SSL_SOCKET: type = getattr(_ssl, "_SSLSocket")  # noqa: B009 - absent from the stubs


class NativeTlsError(Exception):
    """A check failed: the native path is not used for this object (or at all)."""


def _read_ptr(address: int) -> int:
    return c_void_p.from_address(address).value or 0


class NativeSession:
    """A TLS session (ticket) held by pointer; freed with the object."""

    __slots__ = ("_free", "lifetime", "ptr", "time")

    def __init__(self, ptr: int, free: Callable[[int], None], time: int, lifetime: int) -> None:
        self.ptr = ptr
        self._free = free
        self.time = time  # when it was issued (seconds since the epoch, as OpenSSL keeps it)
        self.lifetime = lifetime  # the server's ticket lifetime hint, seconds

    def __del__(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            self._free(ptr)


class NativeTls:
    """The OpenSSL functions the proxy calls directly, bound to the `ssl` module's libssl."""

    def __init__(self, head: int = _HEAD) -> None:
        # Where the C fields of the _ssl objects start (after PyObject_HEAD); a parameter
        # only so that tests can show a layout that does not match is refused.
        self._head = head
        # dlsym on the _ssl extension finds the libssl/libcrypto it was linked with.
        lib = ctypes.CDLL(_ssl.__file__)

        def bind(name: str, args: list[type], res: type | None) -> Callable[..., Any]:
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = res
            return fn  # type: ignore[no-any-return]

        version = bind("OpenSSL_version_num", [], ctypes.c_ulong)
        if version() != ssl.OPENSSL_VERSION_NUMBER:
            raise NativeTlsError(
                f"OpenSSL {version():#x} found, the ssl module reports "
                f"{ssl.OPENSSL_VERSION_NUMBER:#x}"
            )
        self._ctx_options = bind("SSL_CTX_get_options", [c_void_p], c_uint64)
        self._ctx_verify_mode = bind("SSL_CTX_get_verify_mode", [c_void_p], c_int)
        self._ctx_ctrl = bind("SSL_CTX_ctrl", [c_void_p, c_int, c_long, c_void_p], c_long)
        self._ctx_ciphersuites = bind("SSL_CTX_set_ciphersuites", [c_void_p, c_char_p], c_int)
        self._ssl_ctx = bind("SSL_get_SSL_CTX", [c_void_p], c_void_p)
        self._set_session = bind("SSL_set_session", [c_void_p, c_void_p], c_int)
        self._get_session = bind("SSL_get_session", [c_void_p], c_void_p)
        self._dup = bind("SSL_SESSION_dup", [c_void_p], c_void_p)
        self._free = bind("SSL_SESSION_free", [c_void_p], None)
        self._get1_session = bind("SSL_get1_session", [c_void_p], c_void_p)
        self._reused = bind("SSL_session_reused", [c_void_p], c_int)
        self._remove_session = bind("SSL_CTX_remove_session", [c_void_p, c_void_p], c_int)
        self._has_ticket = bind("SSL_SESSION_has_ticket", [c_void_p], c_int)
        self._resumable = bind("SSL_SESSION_is_resumable", [c_void_p], c_int)
        self._session_time = bind("SSL_SESSION_get_time", [c_void_p], c_long)
        self._lifetime = bind("SSL_SESSION_get_ticket_lifetime_hint", [c_void_p], ctypes.c_ulong)
        self._check_layout()

    # -- pointers --------------------------------------------------------------------

    def _check_layout(self) -> None:
        if sys.implementation.name != "cpython":
            raise NativeTlsError(f"not CPython ({sys.implementation.name})")
        least = {"_SSLContext": 1, "_SSLSocket": 3}  # pointer fields we read
        for name, fields in least.items():
            size = int(getattr(_ssl, name).__basicsize__)
            if size < self._head + fields * _PTR:
                raise NativeTlsError(f"_ssl.{name} is too small ({size} bytes)")
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx = self.context_pointer(probe)
        sslobj = probe.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=False)
        ptr = self.ssl_pointer(sslobj)
        if self._ssl_ctx(ptr) != ctx:
            raise NativeTlsError("a probe connection does not lead back to its context")

    def context_pointer(self, context: ssl.SSLContext) -> int:
        """The SSL_CTX* of `context`, once OpenSSL confirms what Python reports about it."""
        if not isinstance(context, _ssl._SSLContext):
            raise NativeTlsError(f"not an SSL context: {type(context).__name__}")
        ptr = _read_ptr(id(context) + self._head)
        if not ptr:
            raise NativeTlsError("no SSL_CTX pointer where expected")
        if self._ctx_options(ptr) != int(context.options):
            raise NativeTlsError("SSL_CTX options differ from the context's")
        if self._ctx_verify_mode(ptr) & 3 != _VERIFY_MODES[context.verify_mode]:
            raise NativeTlsError("SSL_CTX verify mode differs from the context's")
        minimum = self._ctx_ctrl(ptr, _SSL_CTRL_GET_MIN_PROTO_VERSION, 0, None)
        if minimum != int(context.minimum_version):
            raise NativeTlsError("SSL_CTX minimum version differs from the context's")
        return ptr

    def ssl_pointer(self, sslobj: ssl.SSLObject) -> int:
        """The SSL* of a connection; its object must name its own context next to it."""
        inner: Any = sslobj._sslobj  # type: ignore[attr-defined]
        if not isinstance(inner, _SSL_SOCKET):
            raise NativeTlsError(f"not an SSL connection: {type(inner).__name__}")
        base = id(inner) + self._head
        if _read_ptr(base + 2 * _PTR) != id(sslobj.context):
            raise NativeTlsError("the connection's object does not have the expected layout")
        ptr = _read_ptr(base + _PTR)
        if not ptr:
            raise NativeTlsError("no SSL pointer where expected")
        return ptr

    # -- contexts --------------------------------------------------------------------

    def tune(self, context: ssl.SSLContext) -> None:
        """Our TLS 1.3 suite order and groups on `context`; NativeTlsError if not set."""
        ptr = self.context_pointer(context)
        if self._ctx_ciphersuites(ptr, TLS13_CIPHERSUITES.encode()) != 1:
            raise NativeTlsError(f"OpenSSL refused the TLS 1.3 suites {TLS13_CIPHERSUITES}")
        if self._ctx_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, c_char_p(GROUPS.encode())) != 1:
            raise NativeTlsError(f"OpenSSL refused the groups {GROUPS}")
        first = context.get_ciphers()[0]["name"]
        if first != TLS13_CIPHERSUITES.split(":", 1)[0]:
            raise NativeTlsError(f"the context's first suite is {first} after setting ours")

    # -- sessions (client side) --------------------------------------------------------

    def offer(self, sslobj: ssl.SSLObject, session: NativeSession) -> None:
        """Offer `session` on a connection that has not started its handshake."""
        if self._set_session(self.ssl_pointer(sslobj), session.ptr) != 1:
            raise NativeTlsError("OpenSSL refused the session")

    def session_mark(self, sslobj: ssl.SSLObject) -> int:
        """Identifies the connection's current session (a pointer, not to be used)."""
        return self._get_session(self.ssl_pointer(sslobj)) or 0

    def new_ticket(self, sslobj: ssl.SSLObject, mark: int) -> NativeSession | None:
        """A private copy of the connection's session if a ticket arrived since `mark`."""
        current = self._get_session(self.ssl_pointer(sslobj)) or 0
        if current == mark or not current or not self._has_ticket(current):
            return None
        if not self._resumable(current):
            return None
        # A copy nobody else holds: OpenSSL marks a session not resumable when a
        # connection using it is freed without a clean shutdown.
        copy = self._dup(current)
        if not copy:
            return None
        return NativeSession(copy, self._free, self._session_time(copy), self._lifetime(copy))

    # -- sessions (server side) --------------------------------------------------------

    def resumed_session(self, sslobj: ssl.SSLObject) -> NativeSession | None:
        """Server side, once the client's hello is read: the cached session it resumes."""
        ptr = self.ssl_pointer(sslobj)
        if not self._reused(ptr):
            return None
        session = self._get1_session(ptr)
        if not session:
            return None
        return NativeSession(session, self._free, 0, 0)

    def retire(self, sslobj: ssl.SSLObject, session: NativeSession) -> None:
        """Drop a resumed session from the server's cache: each ticket is good once (the
        connection has its own copy by now, and a new ticket of its own)."""
        ptr = self.ssl_pointer(sslobj)
        self._remove_session(self._ssl_ctx(ptr), session.ptr)


_loaded: NativeTls | None = None
_tried = False


def load() -> NativeTls | None:
    """The native helpers, or None (logged once) when they cannot be used safely here."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get(ENV, "on").strip().lower() in ("off", "0", "false", "no"):
        log.info("native TLS settings turned off (%s)", ENV, extra={"native_tls": False})
        return None
    try:
        _loaded = NativeTls()
    except (NativeTlsError, OSError, AttributeError, ValueError) as exc:
        log.warning(
            "TLS runs on Python's defaults (P-256 only, OpenSSL's suite order, slower "
            "session resumption): %s",
            exc,
            extra={"native_tls": False, "error": str(exc)},
        )
    return _loaded
