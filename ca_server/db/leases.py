"""Leases: one holder at a time for a named job across every CA replica."""

from __future__ import annotations

from sqlalchemy import or_, select, update

from ca_server.db.models import LEASES
from ca_server.db.txbase import TxBase
from ca_server.errors import AlreadyExists

_L = LEASES.c


class LeaseOps(TxBase):
    def try_lease(self, name: str, holder: str, now: float, ttl: float) -> bool:
        """Take or extend the lease `name` for `holder` until now + ttl. False while another
        holder's lease is unexpired. Commit the transaction to make it count."""
        self._require_write("try_lease")
        taken = self._exec(
            update(LEASES)
            .where(_L.name == name, or_(_L.expires_at <= now, _L.holder == holder))
            .values(holder=holder, expires_at=now + ttl)
        )
        if taken.rowcount:
            return True
        try:
            self._insert_one(
                LEASES, {"name": name, "holder": holder, "expires_at": now + ttl}, what="lease"
            )
        except AlreadyExists:
            return False  # another replica holds it
        return True

    def release_lease(self, name: str, holder: str) -> None:
        self._require_write("release_lease")
        self._exec(
            update(LEASES).where(_L.name == name, _L.holder == holder).values(expires_at=0.0)
        )

    def lease_holder(self, name: str, now: float) -> str | None:
        row = self._exec(
            select(_L.holder).where(_L.name == name, _L.expires_at > now)
        ).one_or_none()
        return None if row is None else str(row.holder)
