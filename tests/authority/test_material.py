"""Creating authorities: bootstrap, a new generation, a new intermediate for rotation."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek, KekError
from ca_server.authority.keys import decrypt_private_key, generate_ca_key
from ca_server.authority.material import (
    bootstrap_authorities,
    new_generation,
    new_intermediate,
)
from ca_server.domain import Authority
from ca_server.errors import ConfigError
from meshtls.identity.x509 import fingerprint_sha256
from tests.authority.conftest import INTERMEDIATE_TTL, ROOT_TTL, TRUST_DOMAIN


def cert_of(authority: Authority) -> x509.Certificate:
    return x509.load_pem_x509_certificate(authority.cert_pem.encode())


def test_bootstrap_makes_an_active_root_and_intermediate(
    authorities: list[Authority], kek: Kek, now: float
) -> None:
    root, inter = authorities
    assert (root.kind, root.state, root.parent_id, root.upstream) == ("root", "active", None, False)
    assert (inter.kind, inter.state, inter.parent_id, inter.upstream) == (
        "intermediate",
        "active",
        root.id,
        False,
    )
    assert len(root.id) == 32
    assert int(root.id, 16) >= 0
    assert root.id != inter.id
    root_cert, inter_cert = cert_of(root), cert_of(inter)
    inter_cert.verify_directly_issued_by(root_cert)
    for record, cert in ((root, root_cert), (inter, inter_cert)):
        assert record.fingerprint_sha256 == fingerprint_sha256(cert)
        assert record.subject == cert.subject.rfc4514_string()
        assert record.not_before == cert.not_valid_before_utc.timestamp()
        assert record.not_after == cert.not_valid_after_utc.timestamp()
        assert record.created_at == now
        assert record.chain_pem == ""
    assert root.subject == "O=example.org,CN=meshtls root CA"
    assert root.not_after == pytest.approx(now + ROOT_TTL, abs=1)
    assert inter.not_after == pytest.approx(now + INTERMEDIATE_TTL, abs=1)


def test_keys_are_encrypted_under_the_kek_bound_to_their_id(
    authorities: list[Authority], kek: Kek
) -> None:
    for authority in authorities:
        assert authority.encrypted_key is not None
        key = decrypt_private_key(authority, kek)
        assert key.public_key() == cert_of(authority).public_key()
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert der not in authority.encrypted_key
        assert der[-32:] not in authority.encrypted_key
    root, inter = authorities
    swapped = dataclasses.replace(inter, id=root.id)
    with pytest.raises(KekError, match=f"cannot decrypt CA key {root.id}"):
        decrypt_private_key(swapped, kek)
    with pytest.raises(KekError, match="wrong KEK"):
        decrypt_private_key(root, Kek.generate())


def test_new_generation_is_prepared(kek: Kek, now: float) -> None:
    root, inter = new_generation(
        TRUST_DOMAIN, root_ttl=86400, intermediate_ttl=3600, now=now, kek=kek
    )
    assert root.state == inter.state == "prepared"
    assert inter.parent_id == root.id


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"root_ttl": 3600, "intermediate_ttl": 7200}, "must not exceed root_ttl"),
        ({"root_ttl": 0, "intermediate_ttl": 0}, "root_ttl must be a positive"),
        ({"root_ttl": 3600, "intermediate_ttl": -1}, "intermediate_ttl must be a positive"),
    ],
)
def test_bad_lifetimes_are_config_errors(
    kek: Kek, now: float, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        bootstrap_authorities(
            TRUST_DOMAIN,
            root_ttl=kwargs["root_ttl"],
            intermediate_ttl=kwargs["intermediate_ttl"],
            now=now,
            kek=kek,
        )


def test_bad_trust_domain_is_a_config_error(kek: Kek, now: float) -> None:
    with pytest.raises(ConfigError, match="lower-case"):
        bootstrap_authorities("Example.ORG", root_ttl=60, intermediate_ttl=60, now=now, kek=kek)


def test_new_intermediate_for_rotation(authorities: list[Authority], kek: Kek, now: float) -> None:
    root, old = authorities
    root_key = decrypt_private_key(root, kek)
    fresh = new_intermediate(
        root, root_key, trust_domain=TRUST_DOMAIN, ttl=3600, now=now + 100, kek=kek
    )
    assert fresh.state == "prepared"
    assert fresh.kind == "intermediate"
    assert fresh.parent_id == root.id
    assert fresh.id != old.id
    assert fresh.fingerprint_sha256 != old.fingerprint_sha256
    cert_of(fresh).verify_directly_issued_by(cert_of(root))
    assert decrypt_private_key(fresh, kek).public_key() == cert_of(fresh).public_key()


def test_new_intermediate_is_capped_at_its_root(
    authorities: list[Authority], kek: Kek, now: float
) -> None:
    root, _ = authorities
    late = root.not_after - 1000
    fresh = new_intermediate(
        root,
        decrypt_private_key(root, kek),
        trust_domain=TRUST_DOMAIN,
        ttl=86400,
        now=late,
        kek=kek,
    )
    assert fresh.not_after == root.not_after
    with pytest.raises(ConfigError, match="has expired"):
        new_intermediate(
            root,
            decrypt_private_key(root, kek),
            trust_domain=TRUST_DOMAIN,
            ttl=60,
            now=root.not_after + 1,
            kek=kek,
        )


def test_new_intermediate_refuses_wrong_inputs(
    authorities: list[Authority], kek: Kek, now: float
) -> None:
    root, inter = authorities
    with pytest.raises(ConfigError, match="does not match its certificate"):
        new_intermediate(
            root, generate_ca_key(), trust_domain=TRUST_DOMAIN, ttl=60, now=now, kek=kek
        )
    with pytest.raises(ConfigError, match="not one of our own roots"):
        new_intermediate(
            inter,
            decrypt_private_key(inter, kek),
            trust_domain=TRUST_DOMAIN,
            ttl=60,
            now=now,
            kek=kek,
        )
