"""Fixtures for the authority tests: a KEK, a bootstrapped root + intermediate, a keyring."""

from __future__ import annotations

import time

import pytest

from ca_server.authority.kek import Kek
from ca_server.authority.keyring import Keyring
from ca_server.authority.material import bootstrap_authorities
from ca_server.authority.signer import Signer
from ca_server.domain import Authority

TRUST_DOMAIN = "example.org"
ROOT_TTL = 365 * 86400
INTERMEDIATE_TTL = 30 * 86400


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def kek() -> Kek:
    return Kek.generate()


@pytest.fixture
def authorities(kek: Kek, now: float) -> list[Authority]:
    return bootstrap_authorities(
        TRUST_DOMAIN, root_ttl=ROOT_TTL, intermediate_ttl=INTERMEDIATE_TTL, now=now, kek=kek
    )


@pytest.fixture
def keyring(authorities: list[Authority], kek: Kek) -> Keyring:
    return Keyring.from_authorities(authorities, kek)


@pytest.fixture
def signer(keyring: Keyring) -> Signer:
    return keyring.signer
