"""Throwaway P-256 PKI for the Envoy and stunnel topologies: one root and two X509-SVID
shaped leaves (client and server), written as PEM files. (The meshtls topology gets its
certificates from a real meshtls CA instead.)"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.svid import svid_builder

TRUST_DOMAIN = "bench.example"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/server"


@dataclass(frozen=True)
class LeafFiles:
    spiffe_id: str
    cert: Path  # leaf PEM
    key: Path  # PKCS#8 PEM


@dataclass(frozen=True)
class BenchPki:
    root: Path
    client: LeafFiles
    server: LeafFiles


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_pki(directory: Path) -> BenchPki:
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    root_path = directory / "root.pem"
    root_path.write_bytes(root.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, spiffe_id: str) -> LeafFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = svid_builder(
            public_key=key.public_key(),
            spiffe_id=spiffe_id,
            issuer_name=root_name,
            issuer_public_key=root_key.public_key(),
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(hours=12),
        ).sign(root_key, hashes.SHA256())
        cert_path = directory / f"{name}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = directory / f"{name}_key.pem"
        _write_key(key_path, key)
        return LeafFiles(spiffe_id, cert_path, key_path)

    return BenchPki(root_path, leaf("client", CLIENT_ID), leaf("server", SERVER_ID))
