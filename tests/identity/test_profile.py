"""The X509-SVID leaf profile checker (meshtls.identity.profile): a correct leaf passes and
every single deviation is reported."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtls.identity.der import DerError, time_value
from meshtls.identity.profile import (
    ISSUER_NAME_MISMATCH,
    IssuerFacts,
    leaf_problems,
    profile_problems,
    validate_leaf,
)
from meshtls.identity.x509 import CertificateError
from tests.support.pki import KeyKind, PrivateKey, ThrowawayCA, make_key

NOW = time.time()
SPIFFE_ID = "spiffe://example.org/svc/web"


def _ku(**overrides: bool) -> x509.KeyUsage:
    fields = {
        "digital_signature": True,
        "content_commitment": False,
        "key_encipherment": False,
        "data_encipherment": False,
        "key_agreement": False,
        "key_cert_sign": False,
        "crl_sign": False,
        "encipher_only": False,
        "decipher_only": False,
    }
    fields.update(overrides)
    return x509.KeyUsage(**fields)


def build_leaf(
    issuer: ThrowawayCA,
    *,
    key: PrivateKey | None = None,
    signer: PrivateKey | None = None,
    subject: x509.Name | None = None,
    serial: int = (1 << 158) | 12345,
    not_before: float = NOW - 30,
    not_after: float = NOW + 3600,
    replace: dict[type[x509.ExtensionType], tuple[x509.ExtensionType, bool] | None] | None = None,
) -> x509.Certificate:
    """A correct X509-SVID, except for what `replace` swaps (None drops an extension)."""
    key = key or make_key()
    extensions: dict[type[x509.ExtensionType], tuple[x509.ExtensionType, bool] | None] = {
        x509.BasicConstraints: (x509.BasicConstraints(ca=False, path_length=None), True),
        x509.KeyUsage: (_ku(), True),
        x509.ExtendedKeyUsage: (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        ),
        x509.SubjectKeyIdentifier: (
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            False,
        ),
        x509.AuthorityKeyIdentifier: (
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            False,
        ),
        x509.SubjectAlternativeName: (
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE_ID)]),
            subject is None,
        ),
    }
    extensions.update(replace or {})
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else x509.Name([]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(dt.datetime.fromtimestamp(not_before, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
    )
    for entry in extensions.values():
        if entry is not None:
            builder = builder.add_extension(entry[0], critical=entry[1])
    signing_key: Any = signer or issuer.key
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def issuer() -> ThrowawayCA:
    return ThrowawayCA.root().intermediate()


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa2048"])
def test_a_correct_leaf_has_no_problems(issuer: ThrowawayCA, kind: KeyKind) -> None:
    key = make_key(kind)
    replace = {}
    if kind == "rsa2048":
        replace[x509.KeyUsage] = (_ku(key_encipherment=True), True)
    leaf = build_leaf(issuer, key=key, replace=replace)  # type: ignore[arg-type]
    assert profile_problems(leaf, issuer.cert) == []
    validate_leaf(leaf, issuer.cert)


def test_a_named_subject_with_a_non_critical_san_is_fine(issuer: ThrowawayCA) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.org")])
    assert profile_problems(build_leaf(issuer, subject=subject), issuer.cert) == []


SAN = x509.SubjectAlternativeName
BAD_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "no SAN",
        {"replace": {SAN: None}},
        "exactly one URI SAN, this certificate has 0",
    ),
    (
        "two URIs",
        {
            "replace": {
                SAN: (
                    SAN(
                        [
                            x509.UniformResourceIdentifier(SPIFFE_ID),
                            x509.UniformResourceIdentifier("spiffe://example.org/other"),
                        ]
                    ),
                    True,
                )
            }
        },
        "has 2",
    ),
    (
        "URI is not a SPIFFE ID",
        {"replace": {SAN: (SAN([x509.UniformResourceIdentifier("https://x.org/a")]), True)}},
        "not a SPIFFE ID",
    ),
    (
        "empty subject, non-critical SAN",
        {"replace": {SAN: (SAN([x509.UniformResourceIdentifier(SPIFFE_ID)]), False)}},
        "SubjectAlternativeName must be critical",
    ),
    (
        "a CA",
        {"replace": {x509.BasicConstraints: (x509.BasicConstraints(ca=True, path_length=0), True)}},
        "must not be a CA",
    ),
    (
        "BasicConstraints not critical",
        {
            "replace": {
                x509.BasicConstraints: (x509.BasicConstraints(ca=False, path_length=None), False)
            }
        },
        "BasicConstraints must be present and critical",
    ),
    ("no KeyUsage", {"replace": {x509.KeyUsage: None}}, "KeyUsage must be present"),
    (
        "no digitalSignature",
        {"replace": {x509.KeyUsage: (_ku(digital_signature=False, key_agreement=True), True)}},
        "must include digitalSignature",
    ),
    (
        "keyCertSign",
        {"replace": {x509.KeyUsage: (_ku(key_cert_sign=True), True)}},
        "must not include keyCertSign",
    ),
    (
        "keyEncipherment on an EC key",
        {"replace": {x509.KeyUsage: (_ku(key_encipherment=True), True)}},
        "keyEncipherment is only for RSA",
    ),
    ("no EKU", {"replace": {x509.ExtendedKeyUsage: None}}, "ExtendedKeyUsage must be present"),
    (
        "serverAuth only",
        {
            "replace": {
                x509.ExtendedKeyUsage: (
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                    False,
                )
            }
        },
        "must include clientAuth",
    ),
    ("no SKI", {"replace": {x509.SubjectKeyIdentifier: None}}, "SubjectKeyIdentifier"),
    ("no AKI", {"replace": {x509.AuthorityKeyIdentifier: None}}, "AuthorityKeyIdentifier must"),
    (
        "AKI of another key",
        {
            "replace": {
                x509.AuthorityKeyIdentifier: (
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(make_key().public_key()),
                    False,
                )
            }
        },
        "does not match the issuer's key",
    ),
    ("short serial", {"serial": 12345}, "at least 128 random bits"),
    ("outlives its issuer", {"not_after": NOW + 400 * 86400}, "outlives its issuer"),
    ("no time between start and end", {"not_before": NOW, "not_after": NOW}, "NotBefore is not"),
    ("signed by another key", {"signer": make_key()}, "signature does not verify"),
]


@pytest.mark.parametrize(
    ("kwargs", "problem"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_each_deviation_is_reported(
    issuer: ThrowawayCA, kwargs: dict[str, Any], problem: str
) -> None:
    leaf = build_leaf(issuer, **kwargs)
    problems = profile_problems(leaf, issuer.cert)
    assert any(problem in p for p in problems), problems
    with pytest.raises(CertificateError, match="breaks the X509-SVID profile"):
        validate_leaf(leaf, issuer.cert)


def test_issuer_name_mismatch_is_reported(issuer: ThrowawayCA) -> None:
    other = ThrowawayCA.root(common_name="some other CA")
    leaf = build_leaf(issuer)
    problems = profile_problems(leaf, other.cert)
    assert "issuer name does not match the issuing CA's subject" in problems


def test_aki_follows_the_issuers_own_ski_method() -> None:
    """A CA whose SKI is not the RFC 5280 SHA-1 hash (e.g. RFC 7093 truncated SHA-256):
    the leaf's AKI must equal that SKI, not a recomputed SHA-1."""
    key = make_key()
    ski = x509.SubjectKeyIdentifier(b"\x01" * 20)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd SKI CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(NOW - 60, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(NOW + 86400, dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(ski, False)
        .sign(key, hashes.SHA256())
    )
    odd = ThrowawayCA(cert=cert, key=key)
    matching = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    good = build_leaf(odd, replace={x509.AuthorityKeyIdentifier: (matching, False)})
    assert profile_problems(good, cert) == []
    sha1_aki = build_leaf(odd)
    assert "AuthorityKeyIdentifier does not match the issuer's key" in profile_problems(
        sha1_aki, cert
    )


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x30",
        b"\x30\x82\xff\xff\x00",
        b"\x04\x03abc",
        b"\x30\x03\x02\x01\x01",
        b"\x30\x0a\x30\x08\xa0\x03\x02\x01\x02\x02\x01\x01",
    ],
    ids=["empty", "truncated", "past the end", "not a SEQUENCE", "no TBS", "too few fields"],
)
def test_malformed_der_is_one_clear_problem(issuer: ThrowawayCA, blob: bytes) -> None:
    problems = leaf_problems(blob, IssuerFacts.of(issuer.cert))
    assert len(problems) == 1
    assert problems[0].startswith("the certificate is not DER this profile can read")


def test_a_truncated_leaf_is_a_problem_not_a_crash(issuer: ThrowawayCA) -> None:
    der = build_leaf(issuer).public_bytes(serialization.Encoding.DER)
    facts = IssuerFacts.of(issuer.cert)
    assert leaf_problems(der, facts) == []
    for cut in range(1, len(der), 7):
        problems = leaf_problems(der[:cut], facts)
        assert problems
        assert all(isinstance(p, str) for p in problems)


def test_the_leaf_issuer_must_be_the_issuers_subject_byte_for_byte(issuer: ThrowawayCA) -> None:
    other = ThrowawayCA.root(common_name="some other CA")
    facts = IssuerFacts.of(issuer.cert)
    leaf = build_leaf(issuer).public_bytes(serialization.Encoding.DER)
    assert ISSUER_NAME_MISMATCH not in leaf_problems(leaf, facts)
    wrong = IssuerFacts(other.cert.subject.public_bytes(), facts.key_identifier, facts.not_after)
    assert ISSUER_NAME_MISMATCH in leaf_problems(leaf, wrong)


@pytest.mark.parametrize(
    ("tag", "text", "expected"),
    [
        (0x17, b"491231235959Z", "2049-12-31T23:59:59+00:00"),
        (0x17, b"500101000000Z", "1950-01-01T00:00:00+00:00"),
        (0x18, b"20500101000000Z", "2050-01-01T00:00:00+00:00"),
    ],
)
def test_der_times(tag: int, text: bytes, expected: str) -> None:
    assert dt.datetime.fromtimestamp(time_value(tag, text), dt.UTC).isoformat() == expected


@pytest.mark.parametrize(
    ("tag", "text"),
    [(0x17, b"4912312359Z"), (0x18, b"20500101000000+0100"), (0x17, b"49123123595aZ")],
)
def test_der_times_outside_rfc5280_are_refused(tag: int, text: bytes) -> None:
    with pytest.raises(DerError):
        time_value(tag, text)
