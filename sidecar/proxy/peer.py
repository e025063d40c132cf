"""Who is on the other end, and why a handshake was refused.

The peer's identity is taken only from the single URI SAN of a certificate whose chain
OpenSSL verified against the current bundle (the contexts require a verified peer, so
`getpeercert()` is only non-empty then). A `Refusal` carries a stable `reason` (a metrics
label) and a message in plain words for the log.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from meshtls.identity.ids import InvalidSpiffeId, SpiffeId


class Refusal(Exception):
    """A connection refused on purpose: `reason` is a label, `message` says why."""

    def __init__(self, reason: str, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.peer_id = peer_id


# Every reason a connection can be refused for (the values of the `reason` label).
REASONS = (
    "no_client_certificate",
    "expired_certificate",
    "not_yet_valid",
    "unknown_authority",
    "invalid_certificate",
    "bad_spiffe_id",
    "not_allowed",
    "unexpected_identity",
    "revoked",
    "tls_version",
    "no_shared_cipher",
    "not_tls",
    "peer_refused",
    "connection_closed",
    "handshake_failed",
    "handshake_timeout",
    "no_identity",
    "connection_limit",
    "upstream_unreachable",
)


@dataclass(frozen=True, slots=True)
class Peer:
    spiffe_id: SpiffeId
    serial: str  # lower-case hex, no leading zeros (as in Snapshot.revoked)
    resumed: bool
    # When the session was resumed (OpenSSL did not check the certificate's validity
    # again), its notAfter as a timestamp; None after a full handshake.
    resumed_not_after: float | None = None


@dataclass(frozen=True, slots=True)
class _CertFacts:
    spiffe_id: SpiffeId
    serial: str
    not_after: float


# What the proxy needs from a peer certificate, by its DER: a handful of certificates
# make most connections, and decoding one into Python (getpeercert, strptime) costs more
# than the rest of the policy checks together.
_FACTS: dict[bytes, _CertFacts] = {}
_FACTS_MAX = 4096


def _facts(sslobj: ssl.SSLObject, der: bytes) -> _CertFacts:
    facts = _FACTS.get(der)
    if facts is not None:
        return facts
    cert = sslobj.getpeercert()
    if not cert:
        raise Refusal("no_client_certificate", "the peer presented no verified certificate")
    sans: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    uris = [value for kind, value in sans if kind == "URI"]
    if len(uris) != 1:
        raise Refusal(
            "bad_spiffe_id",
            f"the peer's certificate must carry exactly one URI SAN (its SPIFFE ID); "
            f"it has {len(uris)}",
        )
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise Refusal("bad_spiffe_id", f"the peer's URI SAN is not a SPIFFE ID: {exc}") from None
    facts = _CertFacts(
        spiffe_id,
        format(int(str(cert.get("serialNumber", "0")), 16), "x"),
        ssl.cert_time_to_seconds(str(cert["notAfter"])),
    )
    if len(_FACTS) >= _FACTS_MAX:
        del _FACTS[next(iter(_FACTS))]  # the oldest entry
    _FACTS[der] = facts
    return facts


def peer_of(sslobj: ssl.SSLObject) -> Peer:
    """The verified peer of a completed handshake; Refusal("bad_spiffe_id") otherwise.

    The contexts require a certificate verified against the bundle (CERT_REQUIRED), so a
    finished handshake with a peer certificate means a verified one."""
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        raise Refusal("no_client_certificate", "the peer presented no certificate")
    facts = _facts(sslobj, der)
    if not sslobj.session_reused:
        return Peer(facts.spiffe_id, facts.serial, False)
    return Peer(facts.spiffe_id, facts.serial, True, facts.not_after)


# OpenSSL X509_V_ERR_* codes
_UNKNOWN_AUTHORITY = {2, 18, 19, 20, 21}
_EXPIRED, _NOT_YET_VALID, _REVOKED = 10, 9, 23

_VERSION_REASONS = {"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_SSL_VERSION"}
_NOT_TLS_REASONS = {
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "HTTPS_PROXY_REQUEST",
    "UNKNOWN_PROTOCOL",
    "PACKET_LENGTH_TOO_LONG",
    "RECORD_LENGTH_MISMATCH",
}
_CIPHER_REASONS = {
    "NO_SHARED_CIPHER",
    "NO_SUITABLE_KEY_SHARE",
    "NO_SHARED_GROUPS",
    "NO_CIPHERS_AVAILABLE",
    "NO_SUITABLE_SIGNATURE_ALGORITHM",
    "NO_SHARED_SIGNATURE_ALGORITHMS",
    "SSLV3_ALERT_HANDSHAKE_FAILURE",
}
_ALERT_PREFIXES = ("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_", "TLSV1_UNRECOGNIZED_NAME")


def no_identity(identity: object) -> Refusal:
    """A listener whose own certificate is not held (yet)."""
    return Refusal(
        "no_identity",
        f"this sidecar holds no certificate for {identity} yet "
        "(is a registration entry for it assigned to this node?)",
    )


def refusal_from_ssl_error(exc: ssl.SSLError, *, server_side: bool) -> Refusal:
    """Translate OpenSSL's verdict into a reason label and a sentence."""
    who = "client" if server_side else "server"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        detail = exc.verify_message
        if code == _EXPIRED:
            return Refusal(
                "expired_certificate", f"the {who}'s certificate (or one above it) has expired"
            )
        if code == _NOT_YET_VALID:
            return Refusal(
                "not_yet_valid",
                f"the {who}'s certificate is not valid yet (is a clock wrong?)",
            )
        if code in _UNKNOWN_AUTHORITY:
            return Refusal(
                "unknown_authority",
                f"the {who}'s certificate was not issued by a CA of the current trust bundle "
                f"({detail})",
            )
        if code == _REVOKED:
            return Refusal("revoked", f"the {who}'s certificate is revoked")
        return Refusal("invalid_certificate", f"the {who}'s certificate is not valid: {detail}")
    reason = exc.reason or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return Refusal("no_client_certificate", "the client presented no certificate")
    if reason in _VERSION_REASONS:
        return Refusal(
            "tls_version", f"the {who} offered no TLS version this listener accepts ({reason})"
        )
    if reason in _NOT_TLS_REASONS:
        return Refusal(
            "not_tls", f"the {who} did not speak TLS (plaintext or HTTP sent to a TLS port?)"
        )
    if reason in _CIPHER_REASONS:
        return Refusal(
            "no_shared_cipher",
            f"no cipher suite or key exchange group in common with the {who} ({reason})",
        )
    if reason.startswith(_ALERT_PREFIXES):
        alert = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
        hint = ""
        if alert == "unknown ca":
            hint = ": it does not trust our certificate's CA (another trust domain or bundle?)"
        elif alert == "certificate expired":
            hint = ": it says our certificate has expired"
        return Refusal("peer_refused", f"the {who} aborted the handshake (alert {alert}){hint}")
    return Refusal("handshake_failed", f"TLS handshake with the {who} failed: {exc}")
