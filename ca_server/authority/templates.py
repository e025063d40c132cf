"""Pure certificate builders for the three kinds of certificate the CA makes.

Each function returns an unsigned `cryptography` `CertificateBuilder`; `sign()` signs it
with the hash that suits the issuer key. The profiles:

- root: self-signed, CA with pathLen 1, keyCertSign + cRLSign + digitalSignature
  (critical), SKI, URI SAN `spiffe://<trust domain>` (as SPIRE puts on its CAs).
- intermediate: CA with pathLen 0, keyCertSign + cRLSign + digitalSignature (critical),
  SKI, AKI, the same URI SAN; never outlives its issuer.
- leaf (X509-SVID): exactly one URI SAN (the SPIFFE ID) plus optional DNS names and IP
  addresses, CA:false (critical), digitalSignature (+ keyEncipherment for RSA keys only,
  critical), EKU serverAuth + clientAuth, SKI, AKI; NotBefore backdated by
  `BACKDATE_SECONDS`, NotAfter capped at the issuer's NotAfter. Its subject is empty, so
  the SAN extension is critical (RFC 5280 4.2.1.6).

Serial numbers are 159-bit positive random integers (158 random bits, top bit set, so
every serial encodes in 20 bytes, the RFC 5280 maximum).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_server.authority.keys import CAPrivateKey, CAPublicKey, signature_hash
from meshtls.clock import utc
from meshtls.identity.ids import SCHEME, SpiffeId, validate_trust_domain
from meshtls.identity.profile import BACKDATE_SECONDS
from meshtls.identity.x509 import PublicKey

ROOT_COMMON_NAME = "meshtls root CA"
INTERMEDIATE_COMMON_NAME = "meshtls intermediate CA"
MAX_ORGANIZATION_LENGTH = 64  # ub-organization-name, RFC 5280 appendix A
MAX_DNS_NAME_LENGTH = 253

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_LEAF_BASIC_CONSTRAINTS = x509.BasicConstraints(ca=False, path_length=None)
_EMPTY_NAME = x509.Name([])


def _key_usage(
    *, digital_signature: bool, key_encipherment: bool = False, ca: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


_CA_KEY_USAGE = _key_usage(digital_signature=True, ca=True)
_LEAF_KEY_USAGE = _key_usage(digital_signature=True)
_LEAF_KEY_USAGE_RSA = _key_usage(digital_signature=True, key_encipherment=True)


class TemplateError(ValueError):
    """A certificate cannot be built from these inputs; the message says why."""


def random_serial() -> int:
    return (1 << 158) | secrets.randbits(158)


def ca_subject(common_name: str, trust_domain: str) -> x509.Name:
    """CN=<common_name>, O=<trust domain> (O left out when the trust domain is longer
    than the 64 characters X.500 allows for it)."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if len(trust_domain) <= MAX_ORGANIZATION_LENGTH:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain))
    return x509.Name(attributes)


def trust_domain_uri(trust_domain: str) -> str:
    return SCHEME + validate_trust_domain(trust_domain)


def authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """AKI naming the issuer's key: its SKI extension when it has one, else computed."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        issuer_key = issuer.public_key()
        if not isinstance(
            issuer_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
        ):
            raise TemplateError(
                f"issuer {issuer.subject.rfc4514_string()} has an unsupported key type "
                f"{type(issuer_key).__name__}"
            ) from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_builder(
    *,
    subject: x509.Name,
    issuer_name: x509.Name,
    public_key: CAPublicKey,
    trust_domain: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None,
    serial: int | None,
) -> x509.CertificateBuilder:
    if not_after <= not_before:
        raise TemplateError(
            f"the certificate would end ({not_after.isoformat()}) before it starts "
            f"({not_before.isoformat()})"
        )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial if serial is not None else random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_uri(trust_domain))]
            ),
            critical=False,
        )
    )


def root_template(
    *,
    trust_domain: str,
    public_key: CAPublicKey,
    now: float,
    ttl_seconds: float,
    path_length: int | None = 1,
    serial: int | None = None,
) -> x509.CertificateBuilder:
    """A self-signed root for `trust_domain`, valid from now (backdated) for `ttl_seconds`."""
    subject = ca_subject(ROOT_COMMON_NAME, trust_domain)
    return _ca_builder(
        subject=subject,
        issuer_name=subject,
        public_key=public_key,
        trust_domain=trust_domain,
        not_before=utc(now - BACKDATE_SECONDS),
        not_after=utc(now + ttl_seconds),
        path_length=path_length,
        serial=serial,
    )


def intermediate_template(
    *,
    trust_domain: str,
    public_key: CAPublicKey,
    issuer: x509.Certificate,
    now: float,
    ttl_seconds: float,
    path_length: int | None = 0,
    serial: int | None = None,
) -> x509.CertificateBuilder:
    """An intermediate under `issuer`; its NotAfter never passes the issuer's."""
    not_before = max(utc(now - BACKDATE_SECONDS), issuer.not_valid_before_utc)
    not_after = min(utc(now + ttl_seconds), issuer.not_valid_after_utc)
    builder = _ca_builder(
        subject=ca_subject(INTERMEDIATE_COMMON_NAME, trust_domain),
        issuer_name=issuer.subject,
        public_key=public_key,
        trust_domain=trust_domain,
        not_before=not_before,
        not_after=not_after,
        path_length=path_length,
        serial=serial,
    )
    return builder.add_extension(authority_key_identifier(issuer), critical=False)


@dataclass(frozen=True)
class IssuerInfo:
    """What a leaf needs from its issuer, computed once per signer rather than per leaf."""

    subject: x509.Name
    aki: x509.AuthorityKeyIdentifier
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def of(cls, issuer: x509.Certificate) -> IssuerInfo:
        return cls(
            subject=issuer.subject,
            aki=authority_key_identifier(issuer),
            not_before=issuer.not_valid_before_utc,
            not_after=issuer.not_valid_after_utc,
        )


def check_dns_name(name: str) -> str:
    """`name` lower-cased if it is a valid DNS name (LDH labels, an optional leading
    `*.` wildcard label), else TemplateError."""
    lowered = name.lower()
    body = lowered[2:] if lowered.startswith("*.") else lowered
    labels = body.split(".")
    if (
        not body
        or len(lowered) > MAX_DNS_NAME_LENGTH
        or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels)
    ):
        raise TemplateError(
            f"{name!r} is not a valid DNS name: use letters, digits and '-' in dot-separated "
            "labels of at most 63 characters (a leading '*.' wildcard is allowed)"
        )
    return lowered


def check_ip_address(value: str | IPAddress) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise TemplateError(f"{value!r} is not an IPv4 or IPv6 address") from None


def leaf_validity(issuer: IssuerInfo, now: float, ttl_seconds: float) -> tuple[int, int]:
    """NotBefore and NotAfter of a leaf, in the whole seconds DER keeps: from `now`
    backdated by `BACKDATE_SECONDS` for `ttl_seconds`, never outside the issuer's validity."""
    if ttl_seconds <= 0:
        raise TemplateError(f"a certificate lifetime must be positive, got {ttl_seconds} s")
    not_before = max(math.floor(now - BACKDATE_SECONDS), int(issuer.not_before.timestamp()))
    not_after = min(math.floor(now + ttl_seconds), int(issuer.not_after.timestamp()))
    if not_after <= not_before:
        raise TemplateError(
            f"the issuing CA expired at {issuer.not_after.isoformat()} (or is not valid "
            "yet); no certificate can be issued under it"
        )
    return not_before, not_after


def leaf_template(
    *,
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    issuer: IssuerInfo,
    now: float,
    ttl_seconds: float,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str | IPAddress] = (),
    serial: int | None = None,
) -> x509.CertificateBuilder:
    """An X509-SVID for `spiffe_id` and `public_key` under `issuer`."""
    not_before, not_after = leaf_validity(issuer, now, ttl_seconds)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(check_dns_name(n)) for n in dns_names)
    names.extend(x509.IPAddress(check_ip_address(a)) for a in ip_addresses)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(_EMPTY_NAME)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else random_serial())
        .not_valid_before(utc(not_before))
        .not_valid_after(utc(not_after))
        .add_extension(_LEAF_BASIC_CONSTRAINTS, critical=True)
        .add_extension(_LEAF_KEY_USAGE_RSA if is_rsa else _LEAF_KEY_USAGE, critical=True)
        .add_extension(_LEAF_EKU, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(issuer.aki, critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
    )


def sign(builder: x509.CertificateBuilder, key: CAPrivateKey) -> x509.Certificate:
    return builder.sign(key, signature_hash(key))
