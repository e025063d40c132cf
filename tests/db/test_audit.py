"""Audit trail (newest first, filters, JSON details) and the bundle version counter."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ca_server.db import Store
from tests.db.builders import T0, audit_event


def test_events_are_listed_newest_first_with_ids_and_details(store: Store) -> None:
    events = [
        audit_event(at=T0 + i, action="certificate.issue", subject=f"serial-{i}") for i in range(5)
    ]
    events.append(audit_event(at=T0 + 2, action="token.use", subject="web-1", details={}))
    with store.transaction() as tx:
        tx.add_audit_events(events)
        tx.add_audit_events([])
    with store.read() as tx:
        newest = tx.list_audit_events(limit=3)
        assert [(e.at, e.subject) for e in newest] == [
            (T0 + 4, "serial-4"),
            (T0 + 3, "serial-3"),
            (T0 + 2, "web-1"),  # same time as serial-2, inserted later: newer
        ]
        assert all(e.id is not None for e in newest)
        assert newest[0].details == events[0].details
        assert [e.subject for e in tx.list_audit_events(limit=10, action="token.use")] == ["web-1"]
        issued = tx.list_audit_events(limit=10, action="certificate.issue", subject="serial-1")
        assert [(e.action, e.actor) for e in issued] == [("certificate.issue", "admin:unix")]
        assert tx.list_audit_events(limit=10, subject="nothing") == []


def test_bundle_version_bumps_atomically_under_concurrency(store: Store) -> None:
    with store.read() as tx:
        assert tx.bundle_version() == 0

    def bump(_: int) -> int:
        with store.transaction() as tx:
            return tx.bump_bundle_version()

    with ThreadPoolExecutor(4) as pool:
        values = list(pool.map(bump, range(40)))
    assert sorted(values) == list(range(1, 41))
    with store.read() as tx:
        assert tx.bundle_version() == 40
