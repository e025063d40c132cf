"""The trust-state counters. The bundle version grows whenever the trust bundle
(authorities) or the revocation list changes, so sidecars and CA replicas can tell they
must refresh; the access version whenever a node's ban or current certificate or a
registration entry changes, so CA replicas drop what they cached about nodes and entries."""

from __future__ import annotations

from sqlalchemy import select

from ca_server.db.models import TRUST_STATE
from ca_server.db.txbase import TxBase, missing_trust_state

_ACCESS_VERSION = select(TRUST_STATE.c.access_version).where(TRUST_STATE.c.id == 1)


class TrustStateOps(TxBase):
    def bundle_version(self) -> int:
        row = self._exec(
            select(TRUST_STATE.c.bundle_version).where(TRUST_STATE.c.id == 1)
        ).one_or_none()
        if row is None:
            raise missing_trust_state()
        return int(row.bundle_version)

    def access_version(self) -> int:
        """The access version; the store bumps it in the same transaction as every node ban,
        node certificate change (enrollment, renewal taking effect) and entry change."""
        row = self._exec(_ACCESS_VERSION).one_or_none()
        if row is None:
            raise missing_trust_state()
        return int(row.access_version)

    def bump_bundle_version(self) -> int:
        """Atomically add one to the bundle version and return the new value. The store
        already bumps it on every authority change and revocation, in the same transaction."""
        self._require_write("bump_bundle_version")
        return self._bump_bundle_version()
