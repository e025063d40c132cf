"""Issuing X509-SVIDs with the active intermediate: the CA's hot path.

A `Signer` holds one intermediate's certificate and decrypted key. `issue_der()` encodes a
leaf straight to DER with `leaf_der.LeafEncoder` (byte for byte what
`templates.leaf_template` would build, proven per signer at construction, else the builder
is used), signs it, and checks the signed bytes against the shared X509-SVID profile
(`meshtls.identity.profile.leaf_problems`) before returning them: a certificate that breaks
the profile is never handed out. `issue()` is the same, parsed.

The private key is never logged; `repr()` names only the authority.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek
from ca_server.authority.keys import (
    CAPrivateKey,
    decrypt_private_key,
    public_key_der,
    signature_hash,
)
from ca_server.authority.leaf_der import LeafEncoder, subject_alt_names
from ca_server.authority.templates import (
    IPAddress,
    IssuerInfo,
    TemplateError,
    check_dns_name,
    check_ip_address,
    leaf_template,
    leaf_validity,
    random_serial,
    sign,
)
from ca_server.domain import Authority
from ca_server.errors import ConfigError, FailedPrecondition, InvalidRequest
from meshtls.identity.ids import SCHEME, InvalidSpiffeId, SpiffeId, validate_trust_domain
from meshtls.identity.profile import IssuerFacts, leaf_problems
from meshtls.identity.x509 import CertificateError, SubjectPublicKey, uri_sans

log = logging.getLogger(__name__)


class ProfileViolation(RuntimeError):
    """A freshly signed certificate broke the X509-SVID profile: a bug in meshtls. It is
    never returned to a caller."""


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def trust_domain_of_ca(cert: x509.Certificate) -> str | None:
    """The trust domain a meshtls CA certificate names in its `spiffe://<td>` URI SAN."""
    for uri in uri_sans(cert):
        if uri.startswith(SCHEME) and "/" not in uri[len(SCHEME) :]:
            try:
                return validate_trust_domain(uri[len(SCHEME) :])
            except InvalidSpiffeId:
                return None
    return None


def _check_can_sign(cert: x509.Certificate, what: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ConfigError(f"{what} is not a CA certificate (BasicConstraints CA is not true)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is None or not ku.key_cert_sign:
        raise ConfigError(f"{what} may not sign certificates (KeyUsage lacks keyCertSign)")


def load_authority_cert(authority: Authority) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(authority.cert_pem.encode())
    except ValueError as exc:
        raise ConfigError(
            f"the stored certificate of CA {authority.kind} {authority.id} is not valid PEM: {exc}"
        ) from None


@dataclass(frozen=True)
class SignedLeaf:
    """A leaf as signed (DER) and the fields the CA records of it."""

    der: bytes
    serial: int
    not_before: float
    not_after: float


class Signer:
    """Issues leaves under one intermediate. Immutable once built, so one Signer may be
    shared by every thread that issues."""

    __slots__ = (
        "_authority_id",
        "_cert",
        "_chain",
        "_chain_der",
        "_encoder",
        "_facts",
        "_issuer",
        "_key",
        "_td",
    )

    def __init__(
        self,
        *,
        authority_id: str,
        cert: x509.Certificate,
        key: CAPrivateKey,
        parent_chain: Sequence[x509.Certificate] = (),
    ) -> None:
        """`parent_chain`: the certificates above `cert`, nearest first, up to the root
        (the root itself may be included; it is never sent after a leaf)."""
        what = f"signing CA {authority_id}"
        if public_key_der(key.public_key()) != public_key_der(cert.public_key()):
            raise ConfigError(f"the private key of {what} does not match its certificate")
        _check_can_sign(cert, what)
        if parent_chain:
            try:
                cert.verify_directly_issued_by(parent_chain[0])
            except (InvalidSignature, ValueError, TypeError) as exc:
                raise ConfigError(
                    f"{what} was not issued by the next certificate of its chain "
                    f"({parent_chain[0].subject.rfc4514_string()}): "
                    f"{exc or 'the signature does not verify'}"
                ) from None
        self._authority_id = authority_id
        self._cert = cert
        self._key = key
        above = [c for c in parent_chain if not is_self_signed(c)]
        self._chain: tuple[x509.Certificate, ...] = (cert, *above)
        self._chain_der = tuple(c.public_bytes(serialization.Encoding.DER) for c in self._chain)
        self._issuer = IssuerInfo.of(cert)
        self._facts = IssuerFacts.of(cert)
        self._encoder = LeafEncoder.for_issuer(key, self._issuer)
        if self._encoder is None:
            log.warning(
                "the direct DER leaf encoder does not match cryptography's for this CA; "
                "issuing with the slower certificate builder",
                extra={"authority_id": authority_id},
            )
        self._td = trust_domain_of_ca(cert)

    @classmethod
    def from_authority(
        cls, authority: Authority, kek: Kek, parent_chain: Sequence[x509.Certificate] = ()
    ) -> Signer:
        """Decrypt the authority's key with `kek` (KekError if it cannot) and build a Signer."""
        cert = load_authority_cert(authority)
        key = decrypt_private_key(authority, kek)
        return cls(authority_id=authority.id, cert=cert, key=key, parent_chain=parent_chain)

    @property
    def authority_id(self) -> str:
        return self._authority_id

    @property
    def cert(self) -> x509.Certificate:
        return self._cert

    @property
    def chain(self) -> list[x509.Certificate]:
        """What follows a leaf on the wire: this intermediate, then any upstream
        intermediates; never the root."""
        return list(self._chain)

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        """`chain` DER-encoded once: it follows every leaf this signer issues."""
        return self._chain_der

    @property
    def not_after(self) -> float:
        return self._facts.not_after

    @property
    def trust_domain(self) -> str | None:
        """The trust domain this CA is limited to, when its certificate names one."""
        return self._td

    def issue(
        self,
        public_key: object,
        spiffe_id: SpiffeId,
        *,
        ttl_seconds: int,
        now: float,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str | IPAddress] = (),
    ) -> x509.Certificate:
        """`issue_der`, parsed."""
        leaf = self.issue_der(
            public_key,
            spiffe_id,
            ttl_seconds=ttl_seconds,
            now=now,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )
        return x509.load_der_x509_certificate(leaf.der)

    def issue_der(
        self,
        public_key: object,
        spiffe_id: SpiffeId,
        *,
        ttl_seconds: int,
        now: float,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str | IPAddress] = (),
    ) -> SignedLeaf:
        """Sign an X509-SVID for `spiffe_id` and `public_key` (a checked
        `SubjectPublicKey`, or a key object checked here), valid from now (backdated) for
        `ttl_seconds` but never past this intermediate's NotAfter.

        Raises InvalidRequest (weak key, bad TTL, bad DNS name or IP, foreign trust
        domain), FailedPrecondition (this intermediate has expired), ProfileViolation
        (a bug: the result broke the profile).
        """
        if isinstance(public_key, SubjectPublicKey):
            key = public_key
        else:
            try:
                key = SubjectPublicKey.of(public_key)
            except CertificateError as exc:
                raise InvalidRequest(str(exc)) from None
        if ttl_seconds <= 0:
            raise InvalidRequest(f"ttl_seconds must be positive, got {ttl_seconds}")
        if self._td is not None and spiffe_id.trust_domain != self._td:
            raise InvalidRequest(
                f"{spiffe_id} is not in trust domain {self._td}, the only one this CA signs for"
            )
        if now >= self._facts.not_after:
            raise FailedPrecondition(
                f"the signing intermediate {self._authority_id} expired at "
                f"{self._issuer.not_after.isoformat()}; rotate to a new intermediate"
            )
        try:
            if self._encoder is None:
                leaf = self._build(key, spiffe_id, now, ttl_seconds, dns_names, ip_addresses)
            else:
                leaf = self._encode(
                    self._encoder, key, spiffe_id, now, ttl_seconds, dns_names, ip_addresses
                )
        except TemplateError as exc:
            raise InvalidRequest(str(exc)) from None
        # The very bytes that were signed are checked (the issuer's signature is this
        # signer's own, so it is not verified again).
        problems = leaf_problems(leaf.der, self._facts)
        if problems:
            log.error(
                "refusing to return a certificate that breaks the X509-SVID profile",
                extra={"authority_id": self._authority_id, "spiffe_id": str(spiffe_id)},
            )
            raise ProfileViolation(
                f"the certificate signed for {spiffe_id} breaks the X509-SVID profile and was "
                f"discarded (a bug in meshtls): {'; '.join(problems)}"
            )
        return leaf

    def _build(
        self,
        key: SubjectPublicKey,
        spiffe_id: SpiffeId,
        now: float,
        ttl_seconds: int,
        dns_names: Iterable[str],
        ip_addresses: Iterable[str | IPAddress],
    ) -> SignedLeaf:
        """The leaf from `cryptography`'s certificate builder (`templates.leaf_template`)."""
        cert = sign(
            leaf_template(
                spiffe_id=spiffe_id,
                public_key=key.load(),
                issuer=self._issuer,
                now=now,
                ttl_seconds=ttl_seconds,
                dns_names=dns_names,
                ip_addresses=ip_addresses,
            ),
            self._key,
        )
        return SignedLeaf(
            cert.public_bytes(serialization.Encoding.DER),
            cert.serial_number,
            cert.not_valid_before_utc.timestamp(),
            cert.not_valid_after_utc.timestamp(),
        )

    def _encode(
        self,
        encoder: LeafEncoder,
        key: SubjectPublicKey,
        spiffe_id: SpiffeId,
        now: float,
        ttl_seconds: int,
        dns_names: Iterable[str],
        ip_addresses: Iterable[str | IPAddress],
    ) -> SignedLeaf:
        """`_build`, byte for byte (whole seconds, as DER encodes them), without building
        the certificate out of Python objects."""
        not_before, not_after = leaf_validity(self._issuer, now, ttl_seconds)
        san = subject_alt_names(
            str(spiffe_id),
            [check_dns_name(n) for n in dns_names],
            [check_ip_address(a) for a in ip_addresses],
        )
        serial = random_serial()
        tbs = encoder.tbs(
            serial=serial,
            not_before=not_before,
            not_after=not_after,
            public_key=key,
            san=san,
        )
        return SignedLeaf(encoder.sign(tbs), serial, float(not_before), float(not_after))

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        """Sign a CRL with this intermediate's key (the key itself never leaves the Signer).
        The caller sets the issuer name, dates and extensions (`authority.crl.build_crl`)."""
        return builder.sign(self._key, signature_hash(self._key))

    def __repr__(self) -> str:
        return f"Signer(authority_id={self._authority_id!r})"
