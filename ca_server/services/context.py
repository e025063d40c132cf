"""The dependencies every CA service needs, built once by the composition root."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ca_server.config import CAConfig
from ca_server.db.store import Store
from ca_server.db.tx import Tx
from ca_server.domain import AuditEvent, CertificateRecord
from ca_server.metrics import CAMetrics
from ca_server.services.audit import log_committed
from ca_server.services.cache import AccessCache
from ca_server.services.ratelimit import RateLimiter
from ca_server.services.trust import TrustState
from ca_server.services.writer import Writer
from meshtls.clock import Clock

T = TypeVar("T")


@dataclass
class CAContext:
    config: CAConfig
    store: Store
    writer: Writer
    trust: TrustState
    clock: Clock
    limiter: RateLimiter
    # Certificates per second this replica signs, across all callers.
    signing_limiter: RateLimiter
    metrics: CAMetrics
    # serial of a node certificate -> the node it authenticates (see services.nodes)
    auth_cache: AccessCache[str, Any]
    # node name -> its registration entries
    entries_cache: AccessCache[str, Any]
    crl: Any = None  # services.crl.CrlCache, set by the composition root
    # Names this process among the replicas (leases, logs).
    replica_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )

    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in a read-only transaction on a worker thread."""

        def run() -> T:
            with self.store.read() as tx:
                return fn(tx)

        return await asyncio.to_thread(run)

    async def lookup(self, fn: Callable[[Tx], T]) -> T:
        """A read of a few rows by key, on the request path, without a worker thread (the
        hand-off and the GIL contention that comes with it cost more than the read). On
        SQLite it runs inline: a WAL read takes no lock. On PostgreSQL the loop awaits it
        through the asyncio driver."""
        if self.store.dialect == "sqlite":
            with self.store.read() as tx:
                return fn(tx)
        return await self.store.run(fn, write=False)

    async def write(self, fn: Callable[[Tx], T], events: list[AuditEvent]) -> T:
        """Run `fn` and record `events` in one committed transaction, then log the events."""

        def work(tx: Tx) -> T:
            result = fn(tx)
            if events:
                tx.add_audit_events(events)
            return result

        result = await self.writer.submit(work)
        log_committed(events)
        return result

    def admit_signatures(self, count: int) -> None:
        """Back-pressure: refuse (RESOURCE_EXHAUSTED with a retry hint) past the replica's
        signing rate, before any work is done."""
        self.signing_limiter.check("signing on this CA replica", cost=count)

    async def take_lease(self, name: str, seconds: float) -> bool:
        """Take (or extend) the cluster-wide lease `name` for this process; False while
        another replica holds it."""
        now = self.clock.now()
        return await self.writer.submit(
            lambda tx: tx.try_lease(name, self.replica_id, now, seconds)
        )

    async def record_issuance(
        self, node_name: str, records: list[CertificateRecord], events: list[AuditEvent]
    ) -> None:
        """Commit issued certificates and their audit events (batched across requests)."""
        from ca_server.services.issuing import RecordIssuance

        await self.writer.submit(RecordIssuance(node_name, tuple(records), tuple(events)))
        log_committed(events)

    async def refresh_trust(self) -> None:
        """Reload the bundle version and revocation list after a change and push them."""
        now = self.clock.now()

        def load(tx: Tx) -> tuple[int, list]:  # type: ignore[type-arg]
            return tx.bundle_version(), tx.revoked_unexpired(now)

        version, revoked = await self.read(load)
        self.metrics.revoked.set(len(revoked))
        self.trust.publish(version, revoked)
