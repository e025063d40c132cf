"""Value objects for what the sidecar holds: trust bundle, SVIDs, entries and the snapshot
it publishes to subscribers (file writer today; TLS proxy, Workload API and SDS later)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import certs_to_pem
from meshtls.identity.x509 import fingerprint_sha256, serial_hex
from sidecar.identity.keys import PrivateKey, key_to_der, key_to_pem


@dataclass(frozen=True)
class TrustBundle:
    """The CA roots this trust domain's peers accept (old and new during a rotation)."""

    trust_domain: str
    roots: tuple[x509.Certificate, ...]
    version: int
    refresh_hint_seconds: int = 0

    def pem(self) -> bytes:
        return certs_to_pem(self.roots)

    def der(self) -> bytes:
        """Concatenated DER of every root (the Workload API's `bundle` field)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.roots)

    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint_sha256(c) for c in self.roots)


@dataclass(frozen=True)
class Svid:
    """An X509-SVID with its private key: `chain` is leaf first, without the root."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey = field(repr=False, compare=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        return serial_hex(self.leaf)

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def chain_pem(self) -> bytes:
        return certs_to_pem(self.chain)

    def chain_der(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def key_pem(self) -> bytes:
        return key_to_pem(self.key)

    def key_der(self) -> bytes:
        return key_to_der(self.key)

    def expired(self, now: float) -> bool:
        return now >= self.not_after


@dataclass(frozen=True)
class Entry:
    """A registration entry of this node, as the CA lists it."""

    id: str
    spiffe_id: SpiffeId
    dns_names: tuple[str, ...] = ()
    ttl_seconds: int = 0
    # Workload selectors such as "unix:uid:1000": who may receive this identity on the
    # Workload API and SDS (sidecar/workload_api/attestation.py). Empty: nobody, unless
    # the sidecar config allows entries without selectors.
    selectors: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    svid: Svid
    issued_at: float  # sidecar clock when it was received (the last renewal)
    renew_at: float


@dataclass(frozen=True)
class WorkloadIdentity:
    entry: Entry
    svid: Svid
    issued_at: float
    renew_at: float


@dataclass(frozen=True)
class Snapshot:
    """Everything a subscriber needs, immutable. `version` grows on every change."""

    version: int
    node: NodeIdentity | None
    bundle: TrustBundle | None
    identities: Mapping[str, WorkloadIdentity]  # by entry id
    revoked: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        version: int,
        node: NodeIdentity | None,
        bundle: TrustBundle | None,
        identities: Mapping[str, WorkloadIdentity],
        revoked: frozenset[str] = frozenset(),
    ) -> Snapshot:
        return cls(version, node, bundle, types.MappingProxyType(dict(identities)), revoked)

    def by_spiffe_id(self, spiffe_id: SpiffeId) -> WorkloadIdentity | None:
        """The freshest identity for `spiffe_id` (several entries may share one ID)."""
        matches = [w for w in self.identities.values() if w.entry.spiffe_id == spiffe_id]
        return max(matches, key=lambda w: w.svid.not_after, default=None)
