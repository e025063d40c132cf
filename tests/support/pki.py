"""A throwaway PKI for tests: roots, intermediates, leaves and CSRs made directly with
`cryptography`, independent of the CA's own templates.

Use it for certificates the CA must refuse or treat as foreign (another CA's root, an
expired or not-yet-valid certificate, a non-CA "intermediate", a weak key), and for the
operator PKI of upstream mode. Everything is in memory until `write()`.

    root = ThrowawayCA.root()
    inter = root.intermediate()
    leaf = inter.leaf("spiffe://example.org/svc/web", not_after=time.time() - 1)  # expired
    csr_der = make_csr(make_key("rsa1024"))
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyKind = Literal["p256", "p384", "p192", "rsa1024", "rsa2048", "ed25519", "dsa"]
PrivateKey = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | dsa.DSAPrivateKey
)

DAY = 86400.0


@functools.cache
def _dsa_parameters() -> dsa.DSAParameters:
    """Generating DSA parameters takes about a second; keys from shared ones are instant."""
    return dsa.generate_parameters(key_size=2048)


def make_key(kind: KeyKind = "p256") -> PrivateKey:
    """A fresh private key of the given kind (weak kinds included, for refusal tests)."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "p192":
        return ec.generate_private_key(ec.SECP192R1())
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (weak on purpose)
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "dsa":
        return _dsa_parameters().generate_private_key()
    raise ValueError(f"unknown key kind {kind!r}")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def make_csr(
    key: PrivateKey,
    *,
    common_name: str = "ignored by the CA",
    uris: Sequence[str] = (),
    pem: bool = False,
) -> bytes:
    """A PKCS#10 CSR signed by `key` (DER unless `pem`); names in it are decoration."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    csr = builder.sign(key, _hash_for(key))
    encoding = serialization.Encoding.PEM if pem else serialization.Encoding.DER
    return csr.public_bytes(encoding)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _name(common_name: str, organization: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _key_usage(*, ca: bool, digital_signature: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey
    # The certificates above `cert`, nearest first, root last (empty for a root).
    parents: tuple[x509.Certificate, ...] = field(default=())

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def chain(self) -> list[x509.Certificate]:
        """This certificate then every one above it, root last."""
        return [self.cert, *self.parents]

    def chain_pem(self, *, include_self: bool = True, include_root: bool = True) -> bytes:
        certs = self.chain if include_self else list(self.parents)
        if not include_root and certs and certs[-1].subject == certs[-1].issuer:
            certs = certs[:-1]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write `<name>.pem` (the certificate) and `<name>.key` (mode 0600)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{name}.pem"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.touch(mode=0o600)
        key_path.chmod(0o600)
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


@dataclass(frozen=True)
class ThrowawayCA(Issued):
    """A CA certificate with its key, able to sign intermediates and leaves."""

    @classmethod
    def root(
        cls,
        *,
        common_name: str = "throwaway root CA",
        organization: str | None = "throwaway",
        trust_domain: str | None = None,
        not_before: float | None = None,
        not_after: float | None = None,
        path_length: int | None = 1,
        key: PrivateKey | None = None,
    ) -> ThrowawayCA:
        """A self-signed root, valid for a year from an hour ago unless told otherwise."""
        now = time.time()
        key = key or make_key()
        subject = _name(common_name, organization)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - 3600 if not_before is None else not_before))
            .not_valid_after(_utc(now + 365 * DAY if not_after is None else not_after))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
            .add_extension(_key_usage(ca=True), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        if trust_domain:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                False,
            )
        return cls(cert=builder.sign(key, _hash_for(key)), key=key)

    def _child(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey
        | rsa.RSAPublicKey
        | ed25519.Ed25519PublicKey
        | dsa.DSAPublicKey,
        not_before: float | None,
        not_after: float | None,
        default_ttl: float,
    ) -> x509.CertificateBuilder:
        now = time.time()
        nb = now - 3600 if not_before is None else not_before
        na = min(now + default_ttl, self.cert.not_valid_after_utc.timestamp())
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(nb))
            .not_valid_after(_utc(na if not_after is None else not_after))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                False,
            )
        )

    def intermediate(
        self,
        *,
        common_name: str = "throwaway intermediate CA",
        organization: str | None = "throwaway",
        ca: bool = True,
        key_cert_sign: bool = True,
        path_length: int | None = 0,
        not_before: float | None = None,
        not_after: float | None = None,
        key: PrivateKey | None = None,
    ) -> ThrowawayCA:
        """A CA under this one (or, with `ca=False` / `key_cert_sign=False`, a certificate
        that only looks like one). Valid for 30 days unless told otherwise."""
        key = key or make_key()
        builder = self._child(
            _name(common_name, organization), key.public_key(), not_before, not_after, 30 * DAY
        )
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True
        ).add_extension(_key_usage(ca=key_cert_sign), True)
        cert = builder.sign(self.key, _hash_for(self.key))
        return ThrowawayCA(cert=cert, key=key, parents=tuple(self.chain))

    def leaf(
        self,
        spiffe_id: str | None = "spiffe://example.org/test/leaf",
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        not_before: float | None = None,
        not_after: float | None = None,
        key: PrivateKey | None = None,
    ) -> Issued:
        """An end-entity certificate (serverAuth + clientAuth), valid for a day unless
        told otherwise; its subject is empty and its SAN critical, as in an X509-SVID."""
        key = key or make_key()
        names: list[x509.GeneralName] = []
        if spiffe_id:
            names.append(x509.UniformResourceIdentifier(spiffe_id))
        names.extend(x509.DNSName(n) for n in dns_names)
        names.extend(x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses)
        builder = self._child(x509.Name([]), key.public_key(), not_before, not_after, DAY)
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(_key_usage(ca=False), True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), True)
        cert = builder.sign(self.key, _hash_for(self.key))
        return Issued(cert=cert, key=key, parents=tuple(self.chain))
