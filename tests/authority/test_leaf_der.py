"""The direct DER leaf encoder produces exactly what cryptography's builder produces, for
every issuer and leaf key type, name mix and date range, and a signer whose encoder
disagrees falls back to the builder instead of issuing anything different."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import math
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca_server.authority import leaf_der
from ca_server.authority.keys import CAPrivateKey
from ca_server.authority.leaf_der import LeafEncoder, subject_alt_names
from ca_server.authority.signer import Signer
from ca_server.authority.templates import (
    IssuerInfo,
    intermediate_template,
    leaf_template,
    root_template,
    sign,
)
from meshtls.identity.der import read_tlv
from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import der_to_pem
from meshtls.identity.profile import BACKDATE_SECONDS, validate_leaf
from meshtls.identity.x509 import PublicKey, SubjectPublicKey
from tests.support.pki import KeyKind, make_key

SID = SpiffeId.parse("spiffe://example.org/ns/prod/sa/a-rather-long-service-account-name")
YEAR = 365 * 86400.0
NOW = 1_795_000_000.0  # 2026-11-19


def _ca(key: CAPrivateKey, *, now: float, ttl: float) -> tuple[x509.Certificate, CAPrivateKey]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = sign(
        root_template(
            trust_domain="example.org", public_key=root_key.public_key(), now=now, ttl_seconds=ttl
        ),
        root_key,
    )
    inter = sign(
        intermediate_template(
            trust_domain="example.org",
            public_key=key.public_key(),
            issuer=root,
            now=now,
            ttl_seconds=ttl,
        ),
        root_key,
    )
    return inter, key


def _issuer_key(kind: str) -> CAPrivateKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _builder_tbs(
    issuer: IssuerInfo,
    key: CAPrivateKey,
    public_key: PublicKey,
    now: float,
    ttl: float,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    serial: int,
) -> bytes:
    builder = leaf_template(
        spiffe_id=SID,
        public_key=public_key,
        issuer=issuer,
        now=now,
        ttl_seconds=ttl,
        dns_names=dns,
        ip_addresses=ips,
        serial=serial,
    )
    return sign(builder, key).tbs_certificate_bytes


@pytest.mark.parametrize("issuer_kind", ["p256", "p384", "ed25519", "rsa2048"])
@pytest.mark.parametrize("leaf_kind", ["p256", "p384", "ed25519", "rsa2048"])
def test_the_encoder_matches_the_builder_byte_for_byte(issuer_kind: str, leaf_kind: str) -> None:
    inter, key = _ca(_issuer_key(issuer_kind), now=NOW, ttl=YEAR)
    issuer = IssuerInfo.of(inter)
    encoder = LeafEncoder.for_issuer(key, issuer)
    assert encoder is not None
    public_key = cast(PublicKey, make_key(cast(KeyKind, leaf_kind)).public_key())
    cases: list[tuple[tuple[str, ...], tuple[str, ...], float, int]] = [
        ((), (), 3600.0, (1 << 158) | 1),
        (("web.example.org",), (), 60.0, (1 << 158) | (1 << 100)),
        (
            tuple(f"host-{i}.web.example.org" for i in range(12)),  # SAN longer than 255 bytes
            ("10.1.2.3", "2001:db8::1"),
            86400.0,
            (1 << 127) + 12345,  # a serial with a leading zero octet
        ),
    ]
    for dns, ips, ttl, serial in cases:
        now = NOW + 0.75  # a fraction of a second: DER keeps whole seconds
        expected = _builder_tbs(issuer, key, public_key, now, ttl, dns, ips, serial)
        ours = encoder.tbs(
            serial=serial,
            not_before=math.floor(now - BACKDATE_SECONDS),
            not_after=math.floor(now + ttl),
            public_key=SubjectPublicKey.of(public_key),
            san=subject_alt_names(str(SID), dns, [ipaddress.ip_address(a) for a in ips]),
        )
        assert ours == expected, (dns, ips, ttl)


def test_dates_from_2050_on_are_generalized_time() -> None:
    """RFC 5280: UTCTime up to 2049, GeneralizedTime from 2050."""
    late = dt.datetime(2049, 12, 31, 23, 0, tzinfo=dt.UTC).timestamp()
    inter, key = _ca(ec.generate_private_key(ec.SECP256R1()), now=late - YEAR, ttl=3 * YEAR)
    issuer = IssuerInfo.of(inter)
    encoder = LeafEncoder.for_issuer(key, issuer)
    assert encoder is not None
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    serial = (1 << 158) | 7
    ours = encoder.tbs(
        serial=serial,
        not_before=math.floor(late - BACKDATE_SECONDS),
        not_after=math.floor(late + 7200),  # 2050-01-01 01:00
        public_key=SubjectPublicKey.of(public_key),
        san=subject_alt_names(str(SID)),
    )
    assert ours == _builder_tbs(issuer, key, public_key, late, 7200, (), (), serial)
    assert b"\x18\x0f20500101010000Z" in ours
    assert b"\x17\x0d491231" in ours


def test_a_signed_leaf_verifies_and_passes_the_profile() -> None:
    for issuer_kind in ("p256", "p384", "ed25519", "rsa2048"):
        inter, key = _ca(_issuer_key(issuer_kind), now=NOW, ttl=YEAR)
        encoder = LeafEncoder.for_issuer(key, IssuerInfo.of(inter))
        assert encoder is not None
        tbs = encoder.tbs(
            serial=(1 << 158) | 99,
            not_before=int(NOW),
            not_after=int(NOW) + 600,
            public_key=SubjectPublicKey.of(ec.generate_private_key(ec.SECP256R1()).public_key()),
            san=subject_alt_names(str(SID)),
        )
        leaf = x509.load_der_x509_certificate(encoder.sign(tbs))
        validate_leaf(leaf, inter)  # includes the signature check


def test_pem_matches_cryptography() -> None:
    inter, _ = _ca(ec.generate_private_key(ec.SECP256R1()), now=NOW, ttl=YEAR)
    der = inter.public_bytes(serialization.Encoding.DER)
    assert der_to_pem(der) == inter.public_bytes(serialization.Encoding.PEM).decode()


def test_read_tlv_reads_long_form_lengths() -> None:
    blob = leaf_der.tlv(0x04, b"x" * 300)
    assert blob[:4] == b"\x04\x82\x01\x2c"
    assert read_tlv(blob, 0) == (0x04, 4, 304)


def test_a_signer_whose_encoder_disagrees_uses_the_builder(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection: the encoder writes every date as GeneralizedTime (wrong before
    2050). The probe comparison catches it, and the signer issues with the builder."""

    def generalized(timestamp: int) -> bytes:
        moment = dt.datetime.fromtimestamp(timestamp, dt.UTC)
        return leaf_der.tlv(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode())

    monkeypatch.setattr(leaf_der, "_time", generalized)
    inter, key = _ca(ec.generate_private_key(ec.SECP256R1()), now=NOW, ttl=YEAR)
    assert LeafEncoder.for_issuer(key, IssuerInfo.of(inter)) is None
    with caplog.at_level(logging.WARNING, logger="ca_server.authority.signer"):
        signer = Signer(authority_id="a1", cert=inter, key=key)
    assert "slower certificate builder" in caplog.text
    leaf = signer.issue(
        ec.generate_private_key(ec.SECP256R1()).public_key(), SID, ttl_seconds=600, now=NOW
    )
    validate_leaf(leaf, inter)
    assert b"\x17\x0d" in leaf.tbs_certificate_bytes  # UTCTime: the builder's encoding


def test_the_signer_issues_through_the_encoder() -> None:
    inter, key = _ca(ec.generate_private_key(ec.SECP256R1()), now=NOW, ttl=YEAR)
    signer = Signer(authority_id="a1", cert=inter, key=key)
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    leaf = signer.issue(
        public_key, SID, ttl_seconds=600, now=NOW + 0.5, dns_names=["Web.Example.org"]
    )
    validate_leaf(leaf, inter)
    assert leaf.public_key() == public_key
    assert leaf.not_valid_before_utc.timestamp() == math.floor(NOW + 0.5 - BACKDATE_SECONDS)
    assert leaf.not_valid_after_utc.timestamp() == math.floor(NOW + 600.5)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org"]
    # Byte for byte what the builder makes from the same serial.
    assert leaf.tbs_certificate_bytes == _builder_tbs(
        IssuerInfo.of(inter),
        key,
        public_key,
        NOW + 0.5,
        600,
        ("web.example.org",),
        (),
        leaf.serial_number,
    )
    assert leaf.signature_hash_algorithm is not None
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
