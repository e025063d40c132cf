"""CA private keys: generation, the signature hash each key type uses, and storage of a
key as KEK ciphertext (PKCS#8 DER encrypted with the authority id as associated data)."""

from __future__ import annotations

from typing import Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca_server.authority.kek import Kek, KekError
from ca_server.domain import Authority

CAPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
CAPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
KeyAlgorithm = Literal["ecdsa-p256", "ecdsa-p384"]

DEFAULT_KEY_ALGORITHM: KeyAlgorithm = "ecdsa-p256"


def generate_ca_key(algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM) -> CAPrivateKey:
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unknown CA key algorithm {algorithm!r}; use ecdsa-p256 or ecdsa-p384")


def signature_hash(key: CAPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash to sign with: SHA-384 for P-384 and larger curves, none for Ed25519
    (it hashes internally), SHA-256 otherwise."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def as_ca_key(key: object, what: str) -> CAPrivateKey:
    """`key` if it is a key type a CA may sign with, else ValueError naming `what`."""
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return key
    raise ValueError(f"{what} is a {type(key).__name__}; a CA key must be ECDSA, RSA or Ed25519")


def public_key_der(key: object) -> bytes:
    """SubjectPublicKeyInfo DER of a public key, for comparing keys."""
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"unsupported public key type {type(key).__name__}")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def encrypt_private_key(key: CAPrivateKey, kek: Kek, authority_id: str) -> bytes:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return kek.encrypt(der, authority_id.encode())


def decrypt_private_key(authority: Authority, kek: Kek) -> CAPrivateKey:
    """The private key of an authority whose key we hold; KekError if it cannot be had."""
    if authority.encrypted_key is None:
        raise KekError(
            f"CA {authority.kind} {authority.id} has no private key in the database "
            "(it belongs to an upstream CA)"
        )
    der = kek.decrypt(authority.encrypted_key, authority.id.encode())
    try:
        key = serialization.load_der_private_key(der, password=None)
    except ValueError:
        raise KekError(
            f"CA key {authority.id} decrypted but is not a valid PKCS#8 private key"
        ) from None
    try:
        return as_ca_key(key, f"CA key {authority.id}")
    except ValueError as exc:
        raise KekError(str(exc)) from None
