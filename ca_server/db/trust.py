"""The trust-state version: one counter that grows whenever the trust bundle (authorities)
or the revocation list changes, so sidecars and CA replicas can tell they must refresh."""

from __future__ import annotations

from sqlalchemy import select

from ca_server.db.models import TRUST_STATE
from ca_server.db.txbase import TxBase, missing_trust_state


class TrustStateOps(TxBase):
    def bundle_version(self) -> int:
        row = self._exec(
            select(TRUST_STATE.c.bundle_version).where(TRUST_STATE.c.id == 1)
        ).one_or_none()
        if row is None:
            raise missing_trust_state()
        return int(row.bundle_version)

    def bump_bundle_version(self) -> int:
        """Atomically add one to the bundle version and return the new value. The store
        already bumps it on every authority change and revocation, in the same transaction."""
        self._require_write("bump_bundle_version")
        return self._bump_bundle_version()
