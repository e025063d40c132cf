"""TLS contexts built from identity snapshots, once per change, never per connection.

Settings (both directions): TLS 1.3 by default, 1.2 allowed by config; TLS 1.2 suites are
ECDHE with AES-GCM or ChaCha20-Poly1305 only (every TLS 1.3 suite is AEAD); key exchange
ECDHE only: X25519 then P-256 where the native helpers work (`native_tls.py`, which also
puts AES-128-GCM first among the TLS 1.3 suites), else P-256 alone (Python 3.11's `ssl`
sets one curve); either way the finite-field groups OpenSSL 3 would otherwise accept in
TLS 1.3 are excluded. No compression, no renegotiation; the peer's chain is verified
against the current trust bundle (roots only, no partial chains) and a client certificate
is required on the server side. Host names are not checked: the peer is identified by the
SPIFFE ID in its certificate (`peer.py`).

Resumption: servers issue one stateful TLS 1.3 ticket per handshake (`OP_NO_TICKET`: the
ticket names a session kept in the context's cache, so resuming needs no decryption and no
certificate decoding; each ticket is good once). Clients keep them (`sessions.py`).

Python's `ssl` loads a certificate and key only from a file, so the PEM goes through an
anonymous memory file (`memfd_create`, read via /proc/self/fd/N): keys never touch a disk.

`TlsContexts.update(snapshot, wanted)` rebuilds only the contexts whose certificate or
bundle changed (so TLS session tickets stay valid across unrelated snapshot changes), and
keeps the previous context when building a new one fails: a bad update never takes a
listener down. Open connections keep the context they started with.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from meshtls.identity.ids import SpiffeId
from meshtls.identity.x509 import CertificateError, normalize_serial
from sidecar.identity.model import Snapshot, Svid, TrustBundle
from sidecar.proxy.config import TlsVersion
from sidecar.proxy.native_tls import NativeTls, NativeTlsError

log = logging.getLogger(__name__)

Role = Literal["server", "client"]
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
KEY_EXCHANGE_CURVE = "prime256v1"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class ContextKey:
    identity: SpiffeId
    role: Role
    min_version: TlsVersion


def build_context(
    role: Role,
    svid: Svid,
    bundle: TrustBundle,
    min_version: TlsVersion,
    native: NativeTls | None = None,
) -> ssl.SSLContext:
    """A context presenting `svid` and verifying peers against `bundle`."""
    protocol = ssl.PROTOCOL_TLS_SERVER if role == "server" else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if role == "server":
        # Stateful single-use tickets, one per handshake (see the module docstring).
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET
        ctx.num_tickets = 1
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.set_ecdh_curve(KEY_EXCHANGE_CURVE)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.der())
    load_identity(ctx, svid)
    if native is not None:
        try:
            native.tune(ctx)
        except NativeTlsError as exc:
            _warn_untuned(exc)
    return ctx


_warned = False


def _warn_untuned(exc: NativeTlsError) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "a TLS context keeps Python's defaults (P-256 only, OpenSSL's suite order): %s",
            exc,
            extra={"error": str(exc)},
        )


def load_identity(ctx: ssl.SSLContext, svid: Svid) -> None:
    """Load the chain and key of `svid` through an anonymous memory file."""
    fd = os.memfd_create("meshtls-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, svid.chain_pem() + svid.key_pem())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _material(svid: Svid, bundle: TrustBundle) -> tuple[str, tuple[str, ...]]:
    return (svid.serial, bundle.fingerprints())


def revoked_serials(snapshot: Snapshot) -> frozenset[str]:
    out: set[str] = set()
    for serial in snapshot.revoked:
        try:
            out.add(normalize_serial(serial))
        except CertificateError:
            log.warning("ignoring a malformed revoked serial", extra={"serial": serial})
    return frozenset(out)


class TlsContexts:
    """The contexts for the identities the listeners use, plus the revoked serials."""

    def __init__(self, native: NativeTls | None = None) -> None:
        self.native = native  # None: Python's defaults (see native_tls.py)
        self._contexts: dict[ContextKey, ssl.SSLContext] = {}
        self._material: dict[ContextKey, tuple[str, tuple[str, ...]]] = {}
        self.revoked: frozenset[str] = frozenset()
        self.snapshot_version = -1

    def get(self, key: ContextKey) -> ssl.SSLContext | None:
        return self._contexts.get(key)

    def update(self, snapshot: Snapshot, wanted: Iterable[ContextKey]) -> None:
        """Bring the contexts in line with `snapshot` for the `wanted` keys."""
        self.revoked = revoked_serials(snapshot)
        self.snapshot_version = snapshot.version
        wanted = set(wanted)
        for key in list(self._contexts):
            if key not in wanted:
                del self._contexts[key]
                del self._material[key]
        bundle = snapshot.bundle
        for key in wanted:
            ident = snapshot.by_spiffe_id(key.identity)
            if ident is None or bundle is None:
                if key in self._contexts:
                    log.warning(
                        "identity no longer held: new connections using it are refused",
                        extra={"spiffe_id": str(key.identity)},
                    )
                self._contexts.pop(key, None)
                self._material.pop(key, None)
                continue
            material = _material(ident.svid, bundle)
            if self._material.get(key) == material:
                continue
            try:
                ctx = build_context(key.role, ident.svid, bundle, key.min_version, self.native)
            except (ssl.SSLError, OSError, ValueError) as exc:
                log.error(
                    "cannot build a TLS context; keeping the previous one",
                    extra={"spiffe_id": str(key.identity), "role": key.role, "error": str(exc)},
                )
                continue
            self._contexts[key] = ctx
            self._material[key] = material
            log.info(
                "TLS context ready",
                extra={
                    "spiffe_id": str(key.identity),
                    "role": key.role,
                    "serial": ident.svid.serial,
                    "bundle_version": bundle.version,
                },
            )
