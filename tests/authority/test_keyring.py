"""The runtime keyring: the signer of the one active intermediate, and the trust bundle."""

from __future__ import annotations

import dataclasses
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek
from ca_server.authority.keyring import Keyring
from ca_server.authority.keys import decrypt_private_key
from ca_server.authority.material import new_generation, new_intermediate
from ca_server.domain import Authority
from ca_server.errors import ConfigError
from meshtls.identity.ids import SpiffeId
from meshtls.identity.profile import validate_leaf
from tests.authority.conftest import TRUST_DOMAIN
from tests.support.pki import make_key

SID = SpiffeId.parse("spiffe://example.org/svc/web")


def test_keyring_from_bootstrap(keyring: Keyring, authorities: list[Authority], now: float) -> None:
    root, inter = authorities
    assert keyring.active_intermediate == inter
    assert keyring.authorities == tuple(authorities)
    assert keyring.signer.authority_id == inter.id
    assert [r.subject.rfc4514_string() for r in keyring.roots] == [root.subject]
    assert keyring.roots_der() == [keyring.roots[0].public_bytes(serialization.Encoding.DER)]
    assert x509.load_pem_x509_certificates(keyring.roots_pem()) == list(keyring.roots)
    leaf = keyring.signer.issue(make_key().public_key(), SID, ttl_seconds=60, now=now)
    validate_leaf(leaf, keyring.signer.cert)


def test_bundle_holds_every_root_that_is_not_retired(
    authorities: list[Authority], kek: Kek, now: float
) -> None:
    """During a rotation the next root is published before it signs anything."""
    old_root, old_inter = authorities
    next_root, next_inter = new_generation(
        TRUST_DOMAIN, root_ttl=86400, intermediate_ttl=3600, now=now, kek=kek
    )
    keyring = Keyring.from_authorities([old_root, old_inter, next_root, next_inter], kek)
    assert keyring.signer.authority_id == old_inter.id
    assert {r.subject.rfc4514_string() for r in keyring.roots} == {old_root.subject}
    assert len(keyring.roots) == 2
    # The swap: the new intermediate active, the old one retired; old root still trusted.
    swapped = [
        old_root,
        dataclasses.replace(old_inter, state="retired"),
        dataclasses.replace(next_root, state="active"),
        dataclasses.replace(next_inter, state="active"),
    ]
    keyring = Keyring.from_authorities(swapped, kek)
    assert keyring.signer.authority_id == next_inter.id
    assert len(keyring.roots) == 2
    # Once the old root retires it leaves the bundle.
    swapped[0] = dataclasses.replace(old_root, state="retired")
    keyring = Keyring.from_authorities(swapped, kek)
    assert [r.public_key() for r in keyring.roots] == [
        x509.load_pem_x509_certificate(next_root.cert_pem.encode()).public_key()
    ]


def test_no_active_intermediate(authorities: list[Authority], kek: Kek) -> None:
    root, inter = authorities
    with pytest.raises(ConfigError, match="no active intermediate"):
        Keyring.from_authorities([root, dataclasses.replace(inter, state="prepared")], kek)
    with pytest.raises(ConfigError, match="no active intermediate"):
        Keyring.from_authorities([], kek)


def test_two_active_intermediates(authorities: list[Authority], kek: Kek, now: float) -> None:
    root, inter = authorities
    other = dataclasses.replace(
        new_intermediate(
            root,
            decrypt_private_key(root, kek),
            trust_domain=TRUST_DOMAIN,
            ttl=60,
            now=now,
            kek=kek,
        ),
        state="active",
    )
    with pytest.raises(ConfigError, match="more than one active intermediate"):
        Keyring.from_authorities([root, inter, other], kek)


def test_wrong_kek_is_a_clear_startup_error(authorities: list[Authority]) -> None:
    other = Kek.generate()
    with pytest.raises(ConfigError) as info:
        Keyring.from_authorities(authorities, other)
    message = str(info.value)
    assert f"cannot decrypt CA key {authorities[1].id}: wrong KEK or corrupted data" in message
    assert f"the KEK given has id {other.id}" in message


def test_corrupted_key_is_a_clear_startup_error(authorities: list[Authority], kek: Kek) -> None:
    root, inter = authorities
    assert inter.encrypted_key is not None
    broken = bytearray(inter.encrypted_key)
    broken[-3] ^= 1
    with pytest.raises(ConfigError, match="wrong KEK or corrupted data"):
        Keyring.from_authorities(
            [root, dataclasses.replace(inter, encrypted_key=bytes(broken))], kek
        )
    with pytest.raises(ConfigError, match="has no stored key"):
        Keyring.from_authorities([root, dataclasses.replace(inter, encrypted_key=None)], kek)


def test_missing_or_retired_root(authorities: list[Authority], kek: Kek) -> None:
    root, inter = authorities
    with pytest.raises(ConfigError, match=re.escape(f"the root {root.id}")):
        Keyring.from_authorities([inter], kek)
    with pytest.raises(ConfigError, match="is retired"):
        Keyring.from_authorities([dataclasses.replace(root, state="retired"), inter], kek)


def test_corrupted_certificate_pem(authorities: list[Authority], kek: Kek) -> None:
    root, inter = authorities
    with pytest.raises(ConfigError, match="not valid PEM"):
        Keyring.from_authorities([root, dataclasses.replace(inter, cert_pem="garbage")], kek)
