"""The certificate builders: root, intermediate and leaf profiles."""

from __future__ import annotations

import ipaddress
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_server.authority import templates
from ca_server.authority.keys import CAPrivateKey, generate_ca_key
from ca_server.authority.templates import (
    IssuerInfo,
    TemplateError,
    check_dns_name,
    intermediate_template,
    leaf_template,
    random_serial,
    root_template,
    sign,
)
from meshtls.identity.ids import SpiffeId
from meshtls.identity.profile import BACKDATE_SECONDS, validate_leaf
from meshtls.identity.x509 import PublicKey, check_public_key
from tests.support.pki import KeyKind, make_key

NOW = 1_800_000_000.0
TD = "example.org"
SID = SpiffeId.parse("spiffe://example.org/svc/web")


def public(kind: KeyKind = "p256") -> PublicKey:
    return check_public_key(make_key(kind).public_key())


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


@pytest.fixture(scope="module")
def root_pair() -> tuple[x509.Certificate, CAPrivateKey]:
    key = generate_ca_key()
    cert = sign(
        root_template(trust_domain=TD, public_key=key.public_key(), now=NOW, ttl_seconds=86400),
        key,
    )
    return cert, key


@pytest.fixture(scope="module")
def intermediate_pair(
    root_pair: tuple[x509.Certificate, CAPrivateKey],
) -> tuple[x509.Certificate, CAPrivateKey]:
    root, root_key = root_pair
    key = generate_ca_key()
    builder = intermediate_template(
        trust_domain=TD, public_key=key.public_key(), issuer=root, now=NOW, ttl_seconds=3600
    )
    return sign(builder, root_key), key


def test_serials_are_random_positive_159_bit_numbers() -> None:
    serials = {random_serial() for _ in range(200)}
    assert len(serials) == 200
    assert all(s.bit_length() == 159 for s in serials)


def test_root_profile(root_pair: tuple[x509.Certificate, CAPrivateKey]) -> None:
    root, _ = root_pair
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meshtls root CA"
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    bc = ext(root, x509.BasicConstraints)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=True, path_length=1)
    ku = ext(root, x509.KeyUsage)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert ku.value.digital_signature
    assert ext(root, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        root.public_key()
    )
    san = ext(root, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert root.not_valid_before_utc.timestamp() == NOW - BACKDATE_SECONDS
    assert root.not_valid_after_utc.timestamp() == NOW + 86400
    assert root.serial_number.bit_length() == 159
    root.verify_directly_issued_by(root)


def test_intermediate_profile_and_cap(
    root_pair: tuple[x509.Certificate, CAPrivateKey],
    intermediate_pair: tuple[x509.Certificate, CAPrivateKey],
) -> None:
    root, root_key = root_pair
    inter, _ = intermediate_pair
    inter.verify_directly_issued_by(root)
    assert inter.issuer == root.subject
    assert ext(inter, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=0)
    assert ext(inter, x509.KeyUsage).critical
    aki = ext(inter, x509.AuthorityKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ext(root, x509.SubjectKeyIdentifier).value.digest
    # Asking for more than the root has left gives what the root has left.
    longer = sign(
        intermediate_template(
            trust_domain=TD,
            public_key=generate_ca_key().public_key(),
            issuer=root,
            now=NOW,
            ttl_seconds=10 * 86400,
        ),
        root_key,
    )
    assert longer.not_valid_after_utc == root.not_valid_after_utc


def test_long_trust_domain_leaves_organization_out() -> None:
    td = "a" * 70 + ".org"
    name = templates.ca_subject("meshtls root CA", td)
    assert name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []
    key = generate_ca_key()
    root = sign(
        root_template(trust_domain=td, public_key=key.public_key(), now=NOW, ttl_seconds=60), key
    )
    assert root.subject == name


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa2048"])
def test_leaf_profile(
    intermediate_pair: tuple[x509.Certificate, CAPrivateKey], kind: KeyKind
) -> None:
    inter, inter_key = intermediate_pair
    leaf = sign(
        leaf_template(
            spiffe_id=SID,
            public_key=public(kind),
            issuer=IssuerInfo.of(inter),
            now=NOW,
            ttl_seconds=600,
            dns_names=["Web.Example.org", "*.svc.example.org"],
            ip_addresses=["127.0.0.1", ipaddress.ip_address("::1")],
        ),
        inter_key,
    )
    validate_leaf(leaf, inter)
    assert len(leaf.subject) == 0
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(SID)]
    assert san.value.get_values_for_type(x509.DNSName) == ["web.example.org", "*.svc.example.org"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    ku = ext(leaf, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature
    assert ku.key_encipherment == (kind == "rsa2048")
    assert not ku.key_cert_sign
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_before_utc.timestamp() == NOW - BACKDATE_SECONDS
    assert leaf.not_valid_after_utc.timestamp() == NOW + 600


def test_leaf_never_outlives_its_issuer(
    intermediate_pair: tuple[x509.Certificate, CAPrivateKey],
) -> None:
    inter, _ = intermediate_pair
    builder = leaf_template(
        spiffe_id=SID,
        public_key=public(),
        issuer=IssuerInfo.of(inter),
        now=NOW + 3000,
        ttl_seconds=3600,
    )
    leaf = sign(builder, intermediate_pair[1])
    assert leaf.not_valid_after_utc == inter.not_valid_after_utc


def test_leaf_under_an_expired_issuer_cannot_be_built(
    intermediate_pair: tuple[x509.Certificate, CAPrivateKey],
) -> None:
    inter, _ = intermediate_pair
    with pytest.raises(TemplateError, match="issuing CA expired"):
        leaf_template(
            spiffe_id=SID,
            public_key=public(),
            issuer=IssuerInfo.of(inter),
            now=NOW + 3700,
            ttl_seconds=60,
        )


@pytest.mark.parametrize("name", ["localhost", "a.b.c", "x-1.example.org", "*.example.org"])
def test_good_dns_names(name: str) -> None:
    assert check_dns_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "a..b",
        "-a.org",
        "a-.org",
        "a_b.org",
        "*",
        "*.",
        "a.*.org",
        "é.org",
        "a" * 64,
        "example.org.",
        "a b",
        ("a" * 60 + ".") * 5,
    ],
)
def test_bad_dns_names(name: str) -> None:
    with pytest.raises(TemplateError, match="not a valid DNS name"):
        check_dns_name(name)


def test_bad_ip_address() -> None:
    with pytest.raises(TemplateError, match="not an IPv4 or IPv6 address"):
        templates.check_ip_address("300.1.1.1")


def test_ca_key_algorithms() -> None:
    p384 = generate_ca_key("ecdsa-p384")
    root = sign(
        root_template(trust_domain=TD, public_key=p384.public_key(), now=NOW, ttl_seconds=60),
        p384,
    )
    assert root.signature_hash_algorithm is not None
    assert root.signature_hash_algorithm.name == "sha384"
    with pytest.raises(ValueError, match="unknown CA key algorithm"):
        generate_ca_key("rsa-1024")  # type: ignore[arg-type]
