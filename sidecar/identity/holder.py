"""What the sidecar holds right now (node identity, trust bundle, registration entries,
workload identities, revoked serials) and the only way to change it.

Every change goes through a method here that persists it to the state directory, keeps the
CA client's credentials in step, and marks the holdings dirty so that the manager publishes
a new snapshot. Only the manager's task calls these methods.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from meshtls.clock import utc
from meshtls.identity.x509 import CertificateError
from sidecar.errors import CAInvalidResponse, StateError
from sidecar.identity.ca_client import CAClient
from sidecar.identity.model import (
    Entry,
    NodeIdentity,
    Snapshot,
    Svid,
    TrustBundle,
    WorkloadIdentity,
)
from sidecar.identity.state import LoadedState, StateStore
from sidecar.identity.verify import chains_to, check_bundle
from sidecar.identity.workloads import diff_entries

log = logging.getLogger(__name__)

Scheduler = Callable[[Svid, float, bool], float]  # (svid, now, fresh) -> renew_at


def iso(ts: float) -> str:
    return utc(ts).isoformat(timespec="seconds")


class Holder:
    def __init__(self, trust_domain: str, node_name: str, client: CAClient, store: StateStore):
        self._trust_domain = trust_domain
        self._node_name = node_name
        self._client = client
        self._store = store
        self.node: NodeIdentity | None = None
        self.bundle: TrustBundle | None = None
        self.entries: dict[str, Entry] | None = None  # None until listed (or loaded)
        self.identities: dict[str, WorkloadIdentity] = {}
        self.revoked: frozenset[str] = frozenset()
        self.forced: set[str] = set()  # entry ids to sign again at the next cycle
        self.force_node = False  # renew the node certificate at the next cycle
        self.dirty = False
        self.persist_failures = 0
        self.has_node = asyncio.Event()  # set while a node certificate is held

    def _persist(self, action: Callable[..., None], *args: Any) -> None:
        """Write through to the state directory; a failing disk is logged and counted, and
        the sidecar keeps serving what it holds in memory."""
        try:
            action(*args)
        except StateError as exc:
            self.persist_failures += 1
            log.error(
                "cannot update the state directory; a restart would lose this change",
                extra={"error": exc.message},
            )

    def snapshot(self, version: int) -> Snapshot:
        return Snapshot.build(version, self.node, self.bundle, self.identities, self.revoked)

    # -- loading -------------------------------------------------------------------------

    async def load(self, state: LoadedState, now: float, schedule: Scheduler) -> float | None:
        """Adopt what the state directory held; returns the NotAfter of an expired node
        certificate found there (for the manager to report), else None."""
        self.bundle = state.bundle
        expired_at: float | None = None
        if state.node is not None:
            svid = state.node.svid
            if svid.expired(now):
                expired_at = svid.not_after
            else:
                renew_at = schedule(svid, now, False)
                self.node = NodeIdentity(self._node_name, svid, state.node.issued_at, renew_at)
        if state.entries is not None:
            self.entries = {e.id: e for e in state.entries}
        for entry_id, (entry, stored) in state.identities.items():
            if self.entries is not None and entry_id not in self.entries:
                self._persist(self._store.remove_identity, entry_id)
                continue
            renew_at = schedule(stored.svid, now, False)
            self.identities[entry_id] = WorkloadIdentity(
                entry, stored.svid, stored.issued_at, renew_at
            )
        if self.node is not None and self.bundle is not None:
            await self._client.use_node(self.node.svid, self.bundle)
            self.has_node.set()
        self.dirty = True
        return expired_at

    # -- node ----------------------------------------------------------------------------

    async def set_node(self, node: NodeIdentity) -> None:
        assert self.bundle is not None, "the bundle is installed before the node"
        self.node = node
        self.force_node = False
        self._persist(self._store.save_node, node)
        await self._client.use_node(node.svid, self.bundle)
        self.has_node.set()
        self.dirty = True

    async def drop_node(self) -> None:
        """Stop using the node certificate (expired or refused). Its file is kept, so a
        restart can still say when it expired."""
        self.node = None
        self.force_node = False
        self.has_node.clear()
        await self._client.forget_node()
        self.dirty = True

    # -- trust bundle --------------------------------------------------------------------

    async def install_bundle(self, bundle: TrustBundle, *, force: bool = False) -> bool:
        """Adopt `bundle` unless it is older than (or the same as) the one held.

        Certificates that no longer chain to it are marked for renewal at once (the CA
        moved to a new root and the old one left the bundle)."""
        current = self.bundle
        if current is not None and not force:
            if bundle.version < current.version:
                return False
            same = bundle.fingerprints() == current.fingerprints()
            if bundle.version == current.version and same:
                return False
        if current is not None and bundle == current:
            return False
        try:
            check_bundle(bundle, self._trust_domain)
        except CertificateError as exc:
            raise CAInvalidResponse(f"trust bundle rejected: {exc}", operation="bundle") from None
        self.bundle = bundle
        self._persist(self._store.save_bundle, bundle)
        if self.node is not None:
            if not chains_to(self.node.svid, bundle):
                self.force_node = True
            await self._client.use_node(self.node.svid, bundle)
        self.forced.update(i for i, w in self.identities.items() if not chains_to(w.svid, bundle))
        self.dirty = True
        log.info(
            "trust bundle updated",
            extra={
                "version": bundle.version,
                "roots": len(bundle.roots),
                "previous_version": current.version if current else None,
            },
        )
        return True

    def set_revoked(self, revoked: frozenset[str]) -> None:
        if revoked == self.revoked:
            return
        self.revoked = revoked
        self.dirty = True
        for ident in self.identities.values():
            if ident.svid.serial in revoked:
                log.warning(
                    "held certificate was revoked; replacing it",
                    extra={"spiffe_id": str(ident.entry.spiffe_id), "serial": ident.svid.serial},
                )
        if self.node is not None and self.node.svid.serial in revoked:
            log.warning("the node certificate was revoked", extra={"serial": self.node.svid.serial})
            self.force_node = True

    # -- workload identities -------------------------------------------------------------

    def put_identity(self, ident: WorkloadIdentity) -> None:
        previous = self.identities.get(ident.entry.id)
        self.identities[ident.entry.id] = ident
        self._persist(self._store.save_identity, ident)
        self.forced.discard(ident.entry.id)
        self.dirty = True
        log.info(
            "identity renewed" if previous else "identity issued",
            extra={
                "spiffe_id": str(ident.entry.spiffe_id),
                "entry_id": ident.entry.id,
                "serial": ident.svid.serial,
                "previous_serial": previous.svid.serial if previous else None,
                "not_after": iso(ident.svid.not_after),
                "renew_at": iso(ident.renew_at),
            },
        )

    def drop_identity(self, entry_id: str) -> WorkloadIdentity | None:
        ident = self.identities.pop(entry_id, None)
        self._persist(self._store.remove_identity, entry_id)
        self.forced.discard(entry_id)
        self.dirty = True
        return ident

    def set_entries(self, listed: dict[str, Entry]) -> None:
        """Follow the CA's list: drop identities whose entry is gone (or now names another
        SPIFFE ID), sign again those whose DNS names or TTL changed, pick up new ones."""
        changes = diff_entries(listed, self.identities)
        for entry_id in changes.removed:
            ident = self.drop_identity(entry_id)
            log.info(
                "registration entry gone or changed on the CA; identity dropped",
                extra={
                    "entry_id": entry_id,
                    "spiffe_id": str(ident.entry.spiffe_id) if ident else None,
                },
            )
        self.forced.update(changes.resign)
        if listed != self.entries:
            added = sorted(str(listed[i].spiffe_id) for i in set(listed) - set(self.entries or {}))
            if added:
                log.info("new registration entries", extra={"spiffe_ids": added})
            self.entries = listed
            self._persist(self._store.save_entries, tuple(listed.values()))
            self.dirty = True

    def expire(self, now: float) -> None:
        """Stop serving workload identities that have expired."""
        for entry_id, ident in list(self.identities.items()):
            if ident.svid.expired(now):
                self.drop_identity(entry_id)
                log.error(
                    "identity expired and is no longer served",
                    extra={
                        "spiffe_id": str(ident.entry.spiffe_id),
                        "serial": ident.svid.serial,
                        "not_after": iso(ident.svid.not_after),
                    },
                )
