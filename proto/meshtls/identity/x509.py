"""Certificate and CSR helpers: key policy, CSR checks, fingerprints, SPIFFE ID extraction."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshtls.identity.ids import InvalidSpiffeId, SpiffeId

MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


class CertificateError(ValueError):
    """A certificate or CSR is malformed or breaks policy; the message says how."""


def check_public_key(key: object) -> PublicKey:
    """Accept ECDSA P-256/P-384, Ed25519 and RSA >= 2048 bits; reject anything else."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise CertificateError(
                f"ECDSA curve {key.curve.name} is not allowed; use P-256 or P-384"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertificateError(
                f"RSA key of {key.key_size} bits is too weak; use at least {MIN_RSA_BITS} bits"
            )
        return key
    raise CertificateError(
        f"key type {type(key).__name__} is not allowed; use ECDSA P-256/P-384, Ed25519 "
        f"or RSA >= {MIN_RSA_BITS}"
    )


def load_csr(der: bytes) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    """Parse a DER (or PEM) CSR, verify its self-signature and check its key.

    Only the public key and the proof of possession are used by the CA; every name the
    CSR asks for is ignored.
    """
    if not der:
        raise CertificateError("the CSR is empty")
    try:
        if der.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(der)
        else:
            csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise CertificateError(f"the CSR is not a valid PKCS#10 request: {exc}") from None
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the CSR's public key cannot be read: {exc}") from None
    checked = check_public_key(key)
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise CertificateError(
            "the CSR signature does not verify: it was not signed by the key it carries"
        )
    return csr, checked


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def normalize_serial(text: str) -> str:
    """Accept `0A:1b:..`, `0x0a1b..` or plain hex; return lower-case hex without leading 0s."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or any(c not in "0123456789abcdef" for c in cleaned) or len(cleaned) > 64:
        raise CertificateError(f"{text!r} is not a certificate serial number in hexadecimal")
    return format(int(cleaned, 16), "x")


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE ID of an X509-SVID; CertificateError if there is not exactly one."""
    return spiffe_id_from_uris(uri_sans(cert))


def spiffe_id_from_uris(uris: list[str]) -> SpiffeId:
    """The SPIFFE ID of a certificate whose URI SANs are `uris`: exactly one is allowed."""
    if len(uris) != 1:
        raise CertificateError(
            f"an X509-SVID must carry exactly one URI SAN, this certificate has {len(uris)}"
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise CertificateError(f"the certificate's URI SAN is not a SPIFFE ID: {exc}") from None


@dataclass(frozen=True)
class Validity:
    not_before_ts: float
    not_after_ts: float

    @classmethod
    def of(cls, cert: x509.Certificate) -> Validity:
        return cls(
            cert.not_valid_before_utc.timestamp(),
            cert.not_valid_after_utc.timestamp(),
        )
