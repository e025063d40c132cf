"""Private keys and certificate signing requests.

Every identity and every renewal gets a fresh ECDSA P-256 key made here; the key never
leaves the host. The CSR carries no names: the CA takes the identity from the registration
entry and the authenticated node, and uses the CSR only for the public key and the proof
that we hold the private key.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

PrivateKey = ec.EllipticCurvePrivateKey


def new_private_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: PrivateKey) -> bytes:
    """A DER PKCS#10 request with an empty subject, signed by `key`."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (what svid_key.pem and TLS libraries expect)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_to_der(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 DER (the Workload API's x509_svid_key)."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes) -> PrivateKey:
    """Load a PKCS#8 PEM key; ValueError unless it is an unencrypted ECDSA key."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"expected an ECDSA private key, found {type(key).__name__}")
    return key


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """True when `cert` certifies the public half of `key`."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)
