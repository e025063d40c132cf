"""Certificate and CSR helpers: key policy, CSR checks, fingerprints, SPIFFE ID extraction."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshtls.identity import der
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


@dataclass(frozen=True, slots=True)
class SubjectPublicKey:
    """A public key that passed the key policy, as a certificate carries it: its DER
    SubjectPublicKeyInfo. The CA signs for this value without building a key object."""

    spki_der: bytes
    is_rsa: bool

    @classmethod
    def of(cls, key: object) -> SubjectPublicKey:
        """Check `key` against the policy (CertificateError if it fails) and encode it."""
        checked = check_public_key(key)
        return cls(
            checked.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            isinstance(checked, rsa.RSAPublicKey),
        )

    def load(self) -> PublicKey:
        """The key as a `cryptography` object."""
        return check_public_key(serialization.load_der_public_key(self.spki_der))


# The SubjectPublicKeyInfo of every allowed key but RSA starts with a fixed header that
# names the algorithm (and curve) and the length of the key that follows. An SPKI with one
# of these headers and that length is an allowed key, byte for byte as `cryptography`
# encodes it (uncompressed points), once a signature made with it verifies.
_FIXED_SPKI_HEADERS = {
    bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200"): 65,  # P-256
    bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200"): 97,  # P-384
    bytes.fromhex("302a300506032b6570032100"): 32,  # Ed25519
}
_UNCOMPRESSED_POINT = 0x04


def _fixed_header_key(spki: bytes) -> SubjectPublicKey | None:
    for header, key_length in _FIXED_SPKI_HEADERS.items():
        if spki.startswith(header) and len(spki) == len(header) + key_length:
            if key_length != 32 and spki[len(header)] != _UNCOMPRESSED_POINT:
                return None
            return SubjectPublicKey(spki, False)
    return None


def _csr_spki(csr: x509.CertificateSigningRequest) -> bytes:
    """The SubjectPublicKeyInfo element of a CSR, as its bytes (PKCS#10:
    CertificationRequestInfo ::= SEQUENCE { version, subject, subjectPKInfo, ... })."""
    info = csr.tbs_certrequest_bytes
    start, end = der.expect(info, 0, der.SEQUENCE)
    _, _, subject_at = der.read_tlv(info, start, end)
    _, _, spki_at = der.read_tlv(info, subject_at, end)
    _, _, spki_end = der.read_tlv(info, spki_at, end)
    return info[spki_at:spki_end]


def _checked_key(csr: x509.CertificateSigningRequest) -> SubjectPublicKey:
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the CSR's public key cannot be read: {exc}") from None
    return SubjectPublicKey.of(key)


def load_csr(data: bytes) -> tuple[x509.CertificateSigningRequest, SubjectPublicKey]:
    """Parse a DER (or PEM) CSR, check its key against the policy and verify its
    self-signature; return it with its checked key.

    Only the public key and the proof of possession are used by the CA; every name the
    CSR asks for is ignored. The common keys (P-256, P-384, Ed25519) are recognised from
    their encoding, so no key object is built for them: the signature check loads the key
    (refusing a point off the curve) and the certificate carries the CSR's own bytes.
    """
    if not data:
        raise CertificateError("the CSR is empty")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
        spki = _csr_spki(csr)
    except ValueError as exc:
        raise CertificateError(f"the CSR is not a valid PKCS#10 request: {exc}") from None
    key = _fixed_header_key(spki) or _checked_key(csr)
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as exc:
        _checked_key(csr)  # a key that cannot be read says so
        raise CertificateError(f"the CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise CertificateError(
            "the CSR signature does not verify: it was not signed by the key it carries"
        )
    return csr, key


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
