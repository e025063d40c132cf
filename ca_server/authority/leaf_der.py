"""The X509-SVID leaf encoded straight to DER from a per-signer template: the hot path of
issuance.

`cryptography`'s `CertificateBuilder` spends about twice as long building Python objects
and encoding them as signing itself takes. Every leaf a signer issues shares most of its
TBSCertificate (version, signature algorithm, issuer name, empty subject, the fixed
extensions, the authority key identifier), so `LeafEncoder` keeps those as bytes and
encodes only what changes: serial, validity, public key, subject key identifier and SANs.

It is only used when it provably agrees with `cryptography`: `LeafEncoder.for_issuer`
builds a probe leaf both ways (the same serial, dates, key and names) and returns None
when the two TBSCertificates differ by a byte, and the signer then keeps using the
builder. Every result is still checked against the X509-SVID profile, from the bytes that
were signed, by the signer before it is returned.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding

from ca_server.authority.keys import CAPrivateKey, signature_hash
from ca_server.authority.templates import IPAddress, IssuerInfo, leaf_template
from meshtls.identity import der
from meshtls.identity.der import elements, read_tlv
from meshtls.identity.ids import SpiffeId
from meshtls.identity.x509 import SubjectPublicKey

_CRITICAL = b"\x01\x01\xff"
_PROBE_ID = SpiffeId.parse("spiffe://probe.meshtls.invalid/leaf-encoder")
_PROBE_DNS = ("probe.meshtls.invalid",)
_PROBE_SERIAL = (1 << 158) | 0x5EED
# UTCTime covers 1950-2049; later dates are GeneralizedTime (RFC 5280 4.1.2.5).
_UTC_TIME_END = dt.datetime(2050, 1, 1, tzinfo=dt.UTC).timestamp()


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + _length(len(value)) + value


_OID_BASIC_CONSTRAINTS = tlv(der.OID, der.OID_BASIC_CONSTRAINTS)
_OID_KEY_USAGE = tlv(der.OID, der.OID_KEY_USAGE)
_OID_EXTENDED_KEY_USAGE = tlv(der.OID, der.OID_EXTENDED_KEY_USAGE)
_OID_SUBJECT_KEY_IDENTIFIER = tlv(der.OID, der.OID_SUBJECT_KEY_IDENTIFIER)
_OID_SUBJECT_ALT_NAME = tlv(der.OID, der.OID_SUBJECT_ALT_NAME)
_OID_SERVER_AUTH = tlv(der.OID, der.OID_SERVER_AUTH)
_OID_CLIENT_AUTH = tlv(der.OID, der.OID_CLIENT_AUTH)
_OID_AUTHORITY_KEY_IDENTIFIER = tlv(der.OID, der.OID_AUTHORITY_KEY_IDENTIFIER)


def _integer(value: int) -> bytes:
    return tlv(der.INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@functools.lru_cache(maxsize=64)  # leaves signed within one second share their dates
def _time(timestamp: int) -> bytes:
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    if timestamp < _UTC_TIME_END:
        return tlv(der.UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(der.GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode())


def _extension(oid: bytes, value: bytes, *, critical: bool) -> bytes:
    return tlv(der.SEQUENCE, oid + (_CRITICAL if critical else b"") + tlv(der.OCTET_STRING, value))


def _key_usage(*, rsa_key: bool) -> bytes:
    # digitalSignature (bit 0), plus keyEncipherment (bit 2) for RSA keys.
    bits = b"\x05\xa0" if rsa_key else b"\x07\x80"
    return _extension(_OID_KEY_USAGE, tlv(der.BIT_STRING, bits), critical=True)


_BASIC_CONSTRAINTS = _extension(_OID_BASIC_CONSTRAINTS, tlv(der.SEQUENCE, b""), critical=True)
_KEY_USAGE = _key_usage(rsa_key=False)
_KEY_USAGE_RSA = _key_usage(rsa_key=True)
_EXTENDED_KEY_USAGE = _extension(
    _OID_EXTENDED_KEY_USAGE, tlv(der.SEQUENCE, _OID_SERVER_AUTH + _OID_CLIENT_AUTH), critical=False
)


def subject_key_identifier(spki_der: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method 1, as `cryptography` computes it: SHA-1 of the subject
    public key's BIT STRING contents (without the unused-bits octet)."""
    _, start, _ = read_tlv(spki_der, 0)
    _, _, algorithm_end = read_tlv(spki_der, start)
    _, bits_start, bits_end = read_tlv(spki_der, algorithm_end)
    return hashlib.sha1(spki_der[bits_start + 1 : bits_end], usedforsecurity=False).digest()


def subject_alt_names(
    uri: str, dns_names: Sequence[str] = (), ip_addresses: Sequence[IPAddress] = ()
) -> bytes:
    """The SAN extension: the SPIFFE ID, then DNS names, then IPs, in that order. The
    names must already be checked (`templates.check_dns_name`, `check_ip_address`)."""
    names = tlv(der.SAN_URI, uri.encode("ascii"))
    for name in dns_names:
        names += tlv(der.SAN_DNS, name.encode("ascii"))
    for address in ip_addresses:
        names += tlv(der.SAN_IP, address.packed)
    return _extension(_OID_SUBJECT_ALT_NAME, tlv(der.SEQUENCE, names), critical=True)


def signing_function(key: CAPrivateKey) -> Callable[[bytes], bytes]:
    """Signs bytes as a certificate's signature, with the algorithm `templates.sign` uses
    (its parameters built once: constructing them costs a tenth of an ECDSA signature)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    algorithm = signature_hash(key)
    assert algorithm is not None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ecdsa = ec.ECDSA(algorithm)
        return lambda data: key.sign(data, ecdsa)
    pkcs1 = padding.PKCS1v15()
    return lambda data: key.sign(data, pkcs1, algorithm)


class LeafEncoder:
    """Encodes and signs X509-SVID leaves for one issuer. Build it with `for_issuer`."""

    __slots__ = ("_aki", "_issuer_name", "_sign", "_signature_algorithm", "_subject", "_version")

    def __init__(self, key: CAPrivateKey, *, probe: x509.Certificate) -> None:
        """`probe`: a leaf `cryptography` built under this issuer, whose fixed parts
        (version, signature algorithm, issuer name, subject, AKI) are reused."""
        self._sign = signing_function(key)
        tbs = probe.tbs_certificate_bytes
        _, start, end = read_tlv(tbs, 0)
        version, _, algorithm, issuer_name, _, subject, _, extensions = elements(tbs, start, end)
        self._version = version
        self._signature_algorithm = algorithm
        self._issuer_name = issuer_name
        self._subject = subject
        _, wrapped_start, _ = read_tlv(extensions, 0)
        _, seq_start, seq_end = read_tlv(extensions, wrapped_start)
        akis = [
            e
            for e in elements(extensions, seq_start, seq_end)
            if e[read_tlv(e, 0)[1] :].startswith(_OID_AUTHORITY_KEY_IDENTIFIER)
        ]
        if len(akis) != 1:
            raise ValueError("the probe leaf has no single authority key identifier")
        self._aki = akis[0]
        cert = probe.public_bytes(serialization.Encoding.DER)
        _, cert_start, cert_end = read_tlv(cert, 0)
        if elements(cert, cert_start, cert_end)[1] != algorithm:
            raise ValueError("the probe's two signature algorithm fields differ")

    @classmethod
    def for_issuer(cls, key: CAPrivateKey, issuer: IssuerInfo) -> LeafEncoder | None:
        """An encoder for leaves under `issuer`, or None when this encoder does not produce
        byte for byte what `cryptography` does for a probe leaf (the caller then keeps
        using `templates.leaf_template`)."""
        probe_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        start, end = issuer.not_before.timestamp(), issuer.not_after.timestamp()
        try:
            probe = leaf_template(
                spiffe_id=_PROBE_ID,
                public_key=probe_key,
                issuer=issuer,
                now=start + (end - start) / 2,
                ttl_seconds=600,
                dns_names=_PROBE_DNS,
                serial=_PROBE_SERIAL,
            ).sign(key, signature_hash(key))
            encoder = cls(key, probe=probe)
            ours = encoder.tbs(
                serial=_PROBE_SERIAL,
                not_before=int(probe.not_valid_before_utc.timestamp()),
                not_after=int(probe.not_valid_after_utc.timestamp()),
                public_key=SubjectPublicKey.of(probe_key),
                san=subject_alt_names(str(_PROBE_ID), _PROBE_DNS),
            )
        except (ValueError, TypeError, IndexError):
            return None
        return encoder if ours == probe.tbs_certificate_bytes else None

    def tbs(
        self,
        *,
        serial: int,
        not_before: int,
        not_after: int,
        public_key: SubjectPublicKey,
        san: bytes,
    ) -> bytes:
        """The TBSCertificate of a leaf; `san` from `subject_alt_names`."""
        spki = public_key.spki_der
        ski = _extension(
            _OID_SUBJECT_KEY_IDENTIFIER,
            tlv(der.OCTET_STRING, subject_key_identifier(spki)),
            critical=False,
        )
        extensions = (
            _BASIC_CONSTRAINTS
            + (_KEY_USAGE_RSA if public_key.is_rsa else _KEY_USAGE)
            + _EXTENDED_KEY_USAGE
            + ski
            + self._aki
            + san
        )
        return tlv(
            der.SEQUENCE,
            self._version
            + _integer(serial)
            + self._signature_algorithm
            + self._issuer_name
            + tlv(der.SEQUENCE, _time(not_before) + _time(not_after))
            + self._subject
            + spki
            + tlv(der.EXPLICIT_3, tlv(der.SEQUENCE, extensions)),
        )

    def sign(self, tbs: bytes) -> bytes:
        """The whole certificate: `tbs`, the algorithm, and the signature over `tbs`."""
        signature = self._sign(tbs)
        return tlv(
            der.SEQUENCE, tbs + self._signature_algorithm + tlv(der.BIT_STRING, b"\x00" + signature)
        )
