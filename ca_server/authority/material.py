"""Creating the CA's own authorities: the first root + intermediate (bootstrap), a new
generation for root rotation, and a new intermediate under an existing root.

Every function returns `ca_server.domain.Authority` records ready for the Store, with the
private key encrypted under the KEK (associated data = the authority id). Nothing here
touches the database or the clock: `now` is passed in.
"""

from __future__ import annotations

import logging
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek
from ca_server.authority.keys import (
    DEFAULT_KEY_ALGORITHM,
    CAPrivateKey,
    KeyAlgorithm,
    encrypt_private_key,
    generate_ca_key,
    public_key_der,
)
from ca_server.authority.signer import load_authority_cert
from ca_server.authority.templates import intermediate_template, root_template, sign
from ca_server.domain import Authority, AuthorityKind, AuthorityState
from ca_server.errors import ConfigError
from meshtls.identity.ids import InvalidSpiffeId, validate_trust_domain
from meshtls.identity.x509 import fingerprint_sha256

log = logging.getLogger(__name__)


def new_authority_id() -> str:
    return uuid.uuid4().hex


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def authority_record(
    cert: x509.Certificate,
    *,
    authority_id: str,
    kind: AuthorityKind,
    state: AuthorityState,
    parent_id: str | None,
    encrypted_key: bytes | None,
    upstream: bool,
    created_at: float,
    chain_pem: str = "",
) -> Authority:
    """The Authority record describing `cert` (fingerprint, subject, validity from it)."""
    return Authority(
        id=authority_id,
        kind=kind,
        state=state,
        parent_id=parent_id,
        cert_pem=cert_pem(cert),
        encrypted_key=encrypted_key,
        upstream=upstream,
        fingerprint_sha256=fingerprint_sha256(cert),
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        created_at=created_at,
        chain_pem=chain_pem,
    )


def _check_inputs(trust_domain: str, **ttls: float) -> None:
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as exc:
        raise ConfigError(str(exc)) from None
    for name, value in ttls.items():
        if value <= 0:
            raise ConfigError(f"{name} must be a positive number of seconds, got {value}")


def new_generation(
    trust_domain: str,
    *,
    root_ttl: float,
    intermediate_ttl: float,
    now: float,
    kek: Kek,
    state: AuthorityState = "prepared",
    key_algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM,
) -> list[Authority]:
    """A new root and an intermediate under it, both in `state`: [root, intermediate]."""
    _check_inputs(trust_domain, root_ttl=root_ttl, intermediate_ttl=intermediate_ttl)
    if intermediate_ttl > root_ttl:
        raise ConfigError(
            f"intermediate_ttl ({intermediate_ttl:g} s) must not exceed root_ttl "
            f"({root_ttl:g} s): an intermediate cannot outlive its root"
        )
    root_key = generate_ca_key(key_algorithm)
    root_cert = sign(
        root_template(
            trust_domain=trust_domain,
            public_key=root_key.public_key(),
            now=now,
            ttl_seconds=root_ttl,
        ),
        root_key,
    )
    root_id = new_authority_id()
    root = authority_record(
        root_cert,
        authority_id=root_id,
        kind="root",
        state=state,
        parent_id=None,
        encrypted_key=encrypt_private_key(root_key, kek, root_id),
        upstream=False,
        created_at=now,
    )
    intermediate = _intermediate_under(
        root,
        root_cert,
        root_key,
        trust_domain=trust_domain,
        ttl=intermediate_ttl,
        now=now,
        kek=kek,
        state=state,
        key_algorithm=key_algorithm,
    )
    log.info(
        "created CA root and intermediate",
        extra={
            "trust_domain": trust_domain,
            "root_id": root.id,
            "intermediate_id": intermediate.id,
            "state": state,
            "kek_id": kek.id,
        },
    )
    return [root, intermediate]


def bootstrap_authorities(
    trust_domain: str,
    *,
    root_ttl: float,
    intermediate_ttl: float,
    now: float,
    kek: Kek,
    key_algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM,
) -> list[Authority]:
    """The first authorities of a new CA: [root, intermediate], both active."""
    return new_generation(
        trust_domain,
        root_ttl=root_ttl,
        intermediate_ttl=intermediate_ttl,
        now=now,
        kek=kek,
        state="active",
        key_algorithm=key_algorithm,
    )


def new_intermediate(
    root: Authority,
    root_key: CAPrivateKey,
    *,
    trust_domain: str,
    ttl: float,
    now: float,
    kek: Kek,
    key_algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM,
) -> Authority:
    """A new intermediate under `root` in state "prepared", for rotation. Its NotAfter is
    capped at the root's (a warning is logged when that shortens it)."""
    _check_inputs(trust_domain, ttl=ttl)
    if root.kind != "root" or root.upstream:
        raise ConfigError(
            f"authority {root.id} is not one of our own roots (kind {root.kind}, "
            f"upstream {root.upstream}); intermediates can only be made under our own root"
        )
    root_cert = load_authority_cert(root)
    if public_key_der(root_key.public_key()) != public_key_der(root_cert.public_key()):
        raise ConfigError(f"the key given for root {root.id} does not match its certificate")
    return _intermediate_under(
        root,
        root_cert,
        root_key,
        trust_domain=trust_domain,
        ttl=ttl,
        now=now,
        kek=kek,
        state="prepared",
        key_algorithm=key_algorithm,
    )


def _intermediate_under(
    root: Authority,
    root_cert: x509.Certificate,
    root_key: CAPrivateKey,
    *,
    trust_domain: str,
    ttl: float,
    now: float,
    kek: Kek,
    state: AuthorityState,
    key_algorithm: KeyAlgorithm,
) -> Authority:
    if now + ttl > root.not_after:
        if now >= root.not_after:
            raise ConfigError(f"root {root.id} has expired; it cannot sign a new intermediate")
        log.warning(
            "intermediate lifetime capped at its root's expiry",
            extra={
                "root_id": root.id,
                "requested_ttl": ttl,
                "granted_ttl": root.not_after - now,
            },
        )
    key = generate_ca_key(key_algorithm)
    cert = sign(
        intermediate_template(
            trust_domain=trust_domain,
            public_key=key.public_key(),
            issuer=root_cert,
            now=now,
            ttl_seconds=ttl,
        ),
        root_key,
    )
    authority_id = new_authority_id()
    return authority_record(
        cert,
        authority_id=authority_id,
        kind="intermediate",
        state=state,
        parent_id=root.id,
        encrypted_key=encrypt_private_key(key, kek, authority_id),
        upstream=False,
        created_at=now,
    )
