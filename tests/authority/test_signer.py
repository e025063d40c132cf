"""Issuing leaves: every result passes the profile, weak keys are refused, lifetimes are
capped, and no key material leaks into logs or reprs."""

from __future__ import annotations

import logging
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek
from ca_server.authority.keyring import Keyring
from ca_server.authority.keys import decrypt_private_key, generate_ca_key
from ca_server.authority.material import bootstrap_authorities
from ca_server.authority.signer import ProfileViolation, Signer
from ca_server.domain import Authority
from ca_server.errors import ConfigError, FailedPrecondition, InvalidRequest
from meshtls.identity.ids import SpiffeId
from meshtls.identity.profile import BACKDATE_SECONDS, validate_leaf
from meshtls.identity.x509 import CertificateError, load_csr, spiffe_id_of
from tests.support.pki import KeyKind, ThrowawayCA, make_csr, make_key

SID = SpiffeId.parse("spiffe://example.org/svc/web")


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa2048"])
def test_csr_keys_that_are_allowed_get_a_valid_svid(
    signer: Signer, keyring: Keyring, kind: KeyKind, now: float
) -> None:
    _, public_key = load_csr(make_csr(make_key(kind)))
    leaf = signer.issue(public_key, SID, ttl_seconds=3600, now=now, dns_names=["web.example.org"])
    validate_leaf(leaf, signer.cert)
    assert spiffe_id_of(leaf) == SID
    assert leaf.public_key() == public_key.load()
    assert leaf.not_valid_before_utc.timestamp() == pytest.approx(now - BACKDATE_SECONDS, abs=1)
    assert leaf.not_valid_after_utc.timestamp() == pytest.approx(now + 3600, abs=1)
    # The chain sent after the leaf is the intermediate alone; the root is the bundle.
    assert signer.chain == [signer.cert]
    assert signer.cert.issuer == keyring.roots[0].subject


@pytest.mark.parametrize("kind", ["rsa1024", "p192", "dsa"])
def test_weak_keys_never_reach_the_signer(signer: Signer, kind: KeyKind, now: float) -> None:
    key = make_key(kind)
    with pytest.raises(CertificateError):
        load_csr(make_csr(key))
    with pytest.raises(InvalidRequest, match=r"not allowed|too weak"):
        signer.issue(key.public_key(), SID, ttl_seconds=60, now=now)


def test_leaf_is_capped_at_the_intermediates_not_after(signer: Signer) -> None:
    near_end = signer.not_after - 600
    leaf = signer.issue(make_key().public_key(), SID, ttl_seconds=86400, now=near_end)
    assert leaf.not_valid_after_utc == signer.cert.not_valid_after_utc
    validate_leaf(leaf, signer.cert)


def test_expired_intermediate_refuses_to_sign(signer: Signer) -> None:
    with pytest.raises(FailedPrecondition, match=r"expired at .*rotate"):
        signer.issue(make_key().public_key(), SID, ttl_seconds=60, now=signer.not_after + 1)


def test_bad_requests(signer: Signer, now: float) -> None:
    key = make_key().public_key()
    with pytest.raises(InvalidRequest, match="ttl_seconds must be positive"):
        signer.issue(key, SID, ttl_seconds=0, now=now)
    with pytest.raises(InvalidRequest, match=r"not in trust domain example\.org"):
        signer.issue(key, SpiffeId.parse("spiffe://other.org/x"), ttl_seconds=60, now=now)
    with pytest.raises(InvalidRequest, match="not a valid DNS name"):
        signer.issue(key, SID, ttl_seconds=60, now=now, dns_names=["bad_name"])
    with pytest.raises(InvalidRequest, match="not an IPv4 or IPv6"):
        signer.issue(key, SID, ttl_seconds=60, now=now, ip_addresses=["localhost"])


def test_serials_are_unique(signer: Signer, now: float) -> None:
    key = make_key().public_key()
    serials = {signer.issue(key, SID, ttl_seconds=60, now=now).serial_number for _ in range(50)}
    assert len(serials) == 50


def test_signer_refuses_a_key_that_is_not_its_certificates(
    authorities: list[Authority], kek: Kek
) -> None:
    root, inter = authorities
    cert = x509.load_pem_x509_certificate(inter.cert_pem.encode())
    with pytest.raises(ConfigError, match="does not match its certificate"):
        Signer(authority_id=inter.id, cert=cert, key=generate_ca_key())
    root_cert = x509.load_pem_x509_certificate(root.cert_pem.encode())
    foreign_root = ThrowawayCA.root(common_name="meshtls root CA").cert
    with pytest.raises(ConfigError, match="was not issued by the next certificate"):
        Signer(
            authority_id=inter.id,
            cert=cert,
            key=decrypt_private_key(inter, kek),
            parent_chain=[foreign_root],
        )
    Signer(
        authority_id=inter.id,
        cert=cert,
        key=decrypt_private_key(inter, kek),
        parent_chain=[root_cert],
    )


def test_signer_refuses_a_non_ca_certificate() -> None:
    leaf = ThrowawayCA.root().intermediate().leaf()
    with pytest.raises(ConfigError, match="not a CA certificate"):
        Signer(authority_id="x", cert=leaf.cert, key=leaf.key)  # type: ignore[arg-type]


def test_no_key_material_in_repr_or_logs(
    kek: Kek, caplog: pytest.LogCaptureFixture, now: float
) -> None:
    caplog.set_level(logging.DEBUG)
    authorities = bootstrap_authorities(
        "example.org", root_ttl=86400, intermediate_ttl=3600, now=now, kek=kek
    )
    keyring = Keyring.from_authorities(authorities, kek)
    keyring.signer.issue(make_key().public_key(), SID, ttl_seconds=60, now=now)
    secrets: list[str] = []
    for authority in authorities:
        key = decrypt_private_key(authority, kek)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        secrets += [der.hex(), repr(der)[2:40], "PRIVATE KEY"]
        assert key.private_numbers().private_value.to_bytes(32, "big").hex() not in str(  # type: ignore[union-attr]
            keyring
        )
    texts = [repr(keyring), repr(keyring.signer), repr(kek)]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.__dict__))
    assert caplog.records, "keyring construction should log"
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert repr(keyring.signer) == f"Signer(authority_id={authorities[1].id!r})"


def test_issue_is_deterministic_about_time(signer: Signer) -> None:
    """`now` is the only clock: a leaf issued 'in an hour' starts then, not now."""
    later = time.time() + 3600
    leaf = signer.issue(make_key().public_key(), SID, ttl_seconds=60, now=later)
    assert leaf.not_valid_before_utc.timestamp() == pytest.approx(later - BACKDATE_SECONDS, abs=1)


def test_issue_der_reports_what_the_leaf_says(signer: Signer, now: float) -> None:
    leaf = signer.issue_der(make_key().public_key(), SID, ttl_seconds=3600, now=now)
    parsed = x509.load_der_x509_certificate(leaf.der)
    assert leaf.serial == parsed.serial_number
    assert leaf.not_before == parsed.not_valid_before_utc.timestamp()
    assert leaf.not_after == parsed.not_valid_after_utc.timestamp()


def test_a_leaf_that_breaks_the_profile_is_never_returned(
    signer: Signer, now: float, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Sabotage the DER encoder (serverAuth only in the EKU): the signed leaf is checked
    from its bytes and discarded with the reason."""
    from ca_server.authority import leaf_der

    server_only = leaf_der.tlv(0x30, b"\x06\x08\x2b\x06\x01\x05\x05\x07\x03\x01")
    monkeypatch.setattr(
        leaf_der,
        "_EXTENDED_KEY_USAGE",
        leaf_der._extension(b"\x06\x03\x55\x1d\x25", server_only, critical=False),
    )
    with pytest.raises(ProfileViolation, match="ExtendedKeyUsage must include clientAuth"):
        signer.issue_der(make_key().public_key(), SID, ttl_seconds=3600, now=now)
    assert "refusing to return a certificate" in caplog.text
