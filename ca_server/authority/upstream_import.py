"""Importing a new operator intermediate into a running upstream-mode CA, and the rule that
decides when it becomes the signer.

`prepare_import` checks what the operator hands over (`meshtls-ca authority import`): a CA
certificate whose key is the one given, not expired, of a trust domain we sign for, living
long enough for the leaf TTL rule (6x the longest leaf TTL), outliving the active
intermediate, and chaining to a root through the chain given or certificates the CA
already holds. It returns the records to store: the intermediate (state "prepared", its key
encrypted under the KEK) and, when it chains to a root the CA does not publish yet, that
root (state "prepared": it enters the trust bundle the moment it is stored).

`import_activation` is the activation rule, a pure function of the journal and the time.
An imported intermediate becomes the signer as soon as all of these hold:
  1. it is valid (its NotBefore has passed);
  2. peers trust its root: at once when the root is already in the bundle; otherwise
     `min_propagation` after the new root was published (as for a scheduled rotation);
  3. it outlives the active intermediate (the active one is nearer its expiry).
When the active intermediate has expired, 2 is waived (the CA cannot sign otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from ca_server.authority.kek import Kek
from ca_server.authority.keys import encrypt_private_key, public_key_der
from ca_server.authority.material import authority_record, cert_pem, new_authority_id
from ca_server.authority.rotation import Action, active_pair
from ca_server.authority.signer import (
    Signer,
    is_self_signed,
    load_authority_cert,
    trust_domain_of_ca,
)
from ca_server.authority.upstream import _check_ca, _describe, _parse_key, build_path
from ca_server.domain import Authority
from ca_server.errors import AlreadyExists, ConfigError, FailedPrecondition, InvalidRequest
from meshtls.clock import utc
from meshtls.identity.pem import certs_from_pem
from meshtls.identity.x509 import CertificateError, check_public_key, fingerprint_sha256


@dataclass(frozen=True)
class ImportPlan:
    intermediate: Authority  # state "prepared"
    new_root: Authority | None  # state "prepared" when the intermediate brings a new root

    @property
    def records(self) -> list[Authority]:
        return [a for a in (self.new_root, self.intermediate) if a is not None]


def _certs(data: bytes, what: str) -> list[x509.Certificate]:
    if not data.strip():
        return []
    try:
        return certs_from_pem(data)
    except ValueError as exc:
        raise InvalidRequest(
            f"the {what} is not in PEM form (-----BEGIN CERTIFICATE-----): "
            f"{str(exc).split('. ')[0]}"
        ) from None


def _when(seconds: float) -> str:
    return utc(seconds).strftime("%Y-%m-%d %H:%M:%SZ")


def _held_certificates(authorities: Sequence[Authority]) -> list[x509.Certificate]:
    """Roots the CA publishes and the chains stored above its intermediates."""
    held: list[x509.Certificate] = []
    for a in authorities:
        if a.kind == "root" and a.state != "retired":
            held.append(load_authority_cert(a))
        elif a.kind == "intermediate" and a.chain_pem.strip():
            held.extend(certs_from_pem(a.chain_pem.encode()))
    return held


def prepare_import(
    cert: bytes,
    key: bytes,
    chain: bytes,
    *,
    authorities: Sequence[Authority],
    kek: Kek,
    now: float,
    trust_domain: str,
    min_lifetime: float,
) -> ImportPlan:
    """Validate an operator intermediate (PEM certificate, PEM key, optional PEM chain)
    for this CA; InvalidRequest / AlreadyExists / FailedPrecondition say what is wrong."""
    active, _ = active_pair(authorities)
    if active is None or not active.upstream:
        raise FailedPrecondition(
            "this CA signs with authorities it made itself, not in upstream mode: "
            "`meshtls-ca authority rotate` renews them; importing an intermediate works only "
            "on a CA started with `upstream` (cert_file, key_file, chain_file)"
        )
    certs = _certs(cert, "certificate")
    if not certs:
        raise InvalidRequest("no certificate given: pass the intermediate's PEM certificate")
    intermediate = certs[0]
    given_chain = [*certs[1:], *_certs(chain, "chain")]
    try:
        return _plan(
            intermediate,
            key,
            given_chain,
            authorities,
            active,
            kek,
            now,
            trust_domain,
            min_lifetime,
        )
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from None


def _plan(
    intermediate: x509.Certificate,
    key_pem: bytes,
    given_chain: list[x509.Certificate],
    authorities: Sequence[Authority],
    active: Authority,
    kek: Kek,
    now: float,
    trust_domain: str,
    min_lifetime: float,
) -> ImportPlan:
    what = "the imported intermediate"
    fingerprint = fingerprint_sha256(intermediate)
    known = next((a for a in authorities if a.fingerprint_sha256 == fingerprint), None)
    if known is not None:
        raise AlreadyExists(f"{what} is already authority {known.id} ({known.state})")
    if is_self_signed(intermediate):
        raise InvalidRequest(
            f"{what} {_describe(intermediate)} is self-signed (a root); give an intermediate "
            "your root signed, and the root in the chain"
        )
    _check_ca(intermediate, what, key_usage_required=True)
    not_before = intermediate.not_valid_before_utc.timestamp()
    not_after = intermediate.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise InvalidRequest(f"{what} {_describe(intermediate)} expired at {_when(not_after)}")
    try:
        check_public_key(intermediate.public_key())
    except CertificateError as exc:
        raise InvalidRequest(f"{what} {_describe(intermediate)}: {exc}") from None
    td = trust_domain_of_ca(intermediate)
    if td is not None and td != trust_domain:
        raise InvalidRequest(
            f"{what} is limited to trust domain {td}; this CA signs for {trust_domain}"
        )
    usable = not_after - max(now, not_before)
    if usable < min_lifetime:
        raise InvalidRequest(
            f"{what} can sign for {usable / 3600:.1f}h (until {_when(not_after)}), but the "
            f"CA's leaf TTLs need an issuer that lives at least 6x the longest of them "
            f"({min_lifetime / 3600:.1f}h); ask your PKI for a longer-lived intermediate"
        )
    if not_after <= active.not_after:
        raise InvalidRequest(
            f"{what} expires at {_when(not_after)}, before the active intermediate "
            f"{active.id} ({_when(active.not_after)}): it would never become the signer"
        )
    key = _parse_key(key_pem, "the imported key")
    if public_key_der(key.public_key()) != public_key_der(intermediate.public_key()):
        raise InvalidRequest(
            "the key does not match the certificate: they are not a pair (check that both "
            "files come from the same issuance)"
        )
    path = build_path(intermediate, [*given_chain, *_held_certificates(authorities)], now)
    on_path = {fingerprint_sha256(c) for c in path}
    for extra in given_chain:
        if fingerprint_sha256(extra) not in on_path and extra != intermediate:
            raise InvalidRequest(
                f"the chain holds {_describe(extra)}, which is not on the path from the "
                "intermediate to its root; give only that path"
            )
    root = path[-1]
    root_fp = fingerprint_sha256(root)
    existing = next(
        (a for a in authorities if a.kind == "root" and a.fingerprint_sha256 == root_fp), None
    )
    if existing is not None and existing.state == "retired":
        raise FailedPrecondition(
            f"{what} chains to root {existing.id}, which this CA has retired; peers may "
            "already have dropped it from their bundles"
        )
    intermediate_id = new_authority_id()
    Signer(authority_id=intermediate_id, cert=intermediate, key=key, parent_chain=path)
    new_root = None
    if existing is None:
        new_root = authority_record(
            root,
            authority_id=new_authority_id(),
            kind="root",
            state="prepared",
            parent_id=None,
            encrypted_key=None,
            upstream=True,
            created_at=now,
        )
    parent = existing if existing is not None else new_root
    assert parent is not None
    record = authority_record(
        intermediate,
        authority_id=intermediate_id,
        kind="intermediate",
        state="prepared",
        parent_id=parent.id,
        encrypted_key=encrypt_private_key(key, kek, intermediate_id),
        upstream=True,
        created_at=now,
        chain_pem="".join(cert_pem(c) for c in path),
    )
    return ImportPlan(record, new_root)


def activation_time(
    candidate: Authority, authorities: Sequence[Authority], propagation: float
) -> float:
    """The earliest time `candidate` may sign: its NotBefore, and `propagation` after its
    root entered the bundle when that root is new (still prepared)."""
    root = next((a for a in authorities if a.id == candidate.parent_id), None)
    published = (
        root.created_at + propagation
        if root is not None and root.state == "prepared"
        else candidate.created_at
    )
    return max(candidate.not_before, published)


def _candidates(authorities: Sequence[Authority], active: Authority) -> list[Authority]:
    return sorted(
        (
            a
            for a in authorities
            if a.kind == "intermediate"
            and a.state == "prepared"
            and a.upstream
            and a.not_after > active.not_after
        ),
        key=lambda a: a.not_after,
        reverse=True,
    )


def import_activation(
    authorities: Sequence[Authority], now: float, propagation: float
) -> Action | None:
    """The activation of an imported intermediate that is due now, if any."""
    active, _ = active_pair(authorities)
    if active is None or not active.upstream:
        return None
    expired = now >= active.not_after
    for candidate in _candidates(authorities, active):
        if not candidate.not_before <= now < candidate.not_after:
            continue
        if expired:
            return Action("activate", "active intermediate expired (emergency)", candidate.id)
        if now >= activation_time(candidate, authorities, propagation):
            return Action(
                "activate", "imported upstream intermediate outlives the active one", candidate.id
            )
    return None


def next_import_activation(authorities: Sequence[Authority], propagation: float) -> float | None:
    """When the next imported intermediate becomes the signer (None if none waits)."""
    active, _ = active_pair(authorities)
    if active is None or not active.upstream:
        return None
    times = [activation_time(c, authorities, propagation) for c in _candidates(authorities, active)]
    return min(times) if times else None
