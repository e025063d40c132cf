"""Key policy, CSR checks and certificate helpers (meshtls.identity.x509)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshtls.identity import x509 as x509_helpers
from meshtls.identity.ids import SpiffeId
from meshtls.identity.x509 import (
    CertificateError,
    SubjectPublicKey,
    Validity,
    check_public_key,
    fingerprint_sha256,
    load_csr,
    normalize_serial,
    serial_hex,
    spiffe_id_of,
    uri_sans,
)
from tests.support.pki import KeyKind, ThrowawayCA, make_csr, make_key


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa2048"])
def test_allowed_keys_pass_and_their_csrs_load(kind: KeyKind) -> None:
    key = make_key(kind)
    assert check_public_key(key.public_key()) == key.public_key()
    for pem in (False, True):
        csr, public_key = load_csr(make_csr(key, pem=pem))
        assert csr.is_signature_valid
        # The key as a certificate will carry it: byte for byte cryptography's encoding,
        # whether it was recognised from its header (P-256, P-384, Ed25519) or loaded (RSA).
        assert public_key == SubjectPublicKey.of(key.public_key())
        assert public_key.load() == key.public_key()
        assert public_key.is_rsa == (kind == "rsa2048")
        # The fixed headers are right: every allowed key but RSA takes the fast path.
        recognised = x509_helpers._fixed_header_key(public_key.spki_der)
        assert (recognised == public_key) == (kind != "rsa2048")


def _tlv(tag: int, value: bytes) -> bytes:
    assert len(value) < 0x80 or len(value) < 0x100
    length = bytes([len(value)]) if len(value) < 0x80 else b"\x81" + bytes([len(value)])
    return bytes([tag]) + length + value


def _p256_csr_with_spki(key: ec.EllipticCurvePrivateKey, spki: bytes) -> bytes:
    """A PKCS#10 request carrying `spki`, signed by `key` (built by hand: cryptography's
    builder always encodes the key itself, uncompressed)."""
    info = _tlv(0x30, b"\x02\x01\x00" + _tlv(0x30, b"") + spki + b"\xa0\x00")
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    ecdsa_with_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    return _tlv(0x30, info + ecdsa_with_sha256 + _tlv(0x03, b"\x00" + signature))


def test_a_compressed_p256_key_is_accepted_and_carried_uncompressed() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    compressed = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    header = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
    _, public_key = load_csr(_p256_csr_with_spki(key, header + compressed))
    assert public_key == SubjectPublicKey.of(key.public_key())


def test_a_p256_point_off_the_curve_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spki = bytearray(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    spki[-1] ^= 0x01  # Y no longer matches X: the header is right, the point is not
    with pytest.raises(CertificateError, match="public key cannot be read"):
        load_csr(_p256_csr_with_spki(key, bytes(spki)))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("rsa1024", "1024 bits is too weak"),
        ("p192", "secp192r1 is not allowed"),
        ("dsa", "DSAPublicKey is not allowed"),
    ],
)
def test_weak_or_unsupported_keys_are_refused(kind: KeyKind, message: str) -> None:
    key = make_key(kind)
    with pytest.raises(CertificateError, match=message):
        check_public_key(key.public_key())
    with pytest.raises(CertificateError, match=message):
        load_csr(make_csr(key))


def test_csr_with_a_broken_signature_is_refused() -> None:
    der = bytearray(make_csr(make_key("p256")))
    der[-5] ^= 0x01  # inside the signature BIT STRING
    with pytest.raises(CertificateError, match="signature"):
        load_csr(bytes(der))


def test_csr_whose_key_did_not_sign_it_is_refused() -> None:
    # Splice the public key of one CSR into another: the self-signature no longer matches.
    a = x509.load_der_x509_csr(make_csr(make_key("p256"), common_name="aaaa"))
    b_key = make_key("p256")
    a_spki = a.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b_spki = b_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    spliced = a.public_bytes(serialization.Encoding.DER).replace(a_spki, b_spki)
    with pytest.raises(CertificateError, match="not signed by the key it carries"):
        load_csr(spliced)


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nxx"])
def test_malformed_csrs_are_refused(data: bytes) -> None:
    with pytest.raises(CertificateError):
        load_csr(data)


def test_fingerprint_serial_and_validity() -> None:
    root = ThrowawayCA.root(not_before=1_700_000_000, not_after=1_800_000_000)
    der = root.cert.public_bytes(serialization.Encoding.DER)
    assert fingerprint_sha256(root.cert) == hashlib.sha256(der).hexdigest()
    assert int(serial_hex(root.cert), 16) == root.cert.serial_number
    assert serial_hex(root.cert) == serial_hex(root.cert).lower()
    assert Validity.of(root.cert) == Validity(1_700_000_000.0, 1_800_000_000.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0A:1b:00", "a1b00"), ("0x00ff", "ff"), ("  DEADbeef ", "deadbeef"), ("0", "0")],
)
def test_normalize_serial(text: str, expected: str) -> None:
    assert normalize_serial(text) == expected


@pytest.mark.parametrize("text", ["", "xyz", "0x", "1" * 65, "12 34"])
def test_normalize_serial_refuses_non_hex(text: str) -> None:
    with pytest.raises(CertificateError, match="hexadecimal"):
        normalize_serial(text)


def test_spiffe_id_of_needs_exactly_one_valid_uri() -> None:
    ca = ThrowawayCA.root().intermediate()
    good = ca.leaf("spiffe://example.org/svc/web", dns_names=["web.example.org"])
    assert spiffe_id_of(good.cert) == SpiffeId.parse("spiffe://example.org/svc/web")
    assert uri_sans(good.cert) == ["spiffe://example.org/svc/web"]
    with pytest.raises(CertificateError, match="has 0"):
        spiffe_id_of(ca.leaf(None, dns_names=["web.example.org"]).cert)
    with pytest.raises(CertificateError, match="has 0"):
        spiffe_id_of(ca.leaf(None).cert)
    with pytest.raises(CertificateError, match="not a SPIFFE ID"):
        spiffe_id_of(ca.leaf("https://example.org/x").cert)
