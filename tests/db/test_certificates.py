"""Issued certificates: batch insert, lookup, paging, revocation, counts, pruning."""

from __future__ import annotations

import pytest

from ca_server.db import Store
from ca_server.errors import AlreadyExists, NotFound
from tests.db.builders import T0, TD, certificate


def test_batch_insert_and_get(store: Store) -> None:
    batch = [certificate(entry_id="e1", kind="workload") for _ in range(250)]
    batch.append(certificate(kind="node", spiffe_id=f"{TD}/meshtls/node/web-1"))
    with store.transaction() as tx:
        tx.add_certificates(batch)
        tx.add_certificates([])
    with store.read() as tx:
        for record in (batch[0], batch[137], batch[-1]):
            assert tx.get_certificate(record.serial) == record
        assert tx.get_certificate("ff" * 20) is None
        assert tx.certificate_counts(T0) == {"valid": 251, "expired": 0, "revoked": 0}


def test_duplicate_serial_refuses_the_whole_batch(store: Store) -> None:
    existing = certificate()
    with store.transaction() as tx:
        tx.add_certificates([existing])
    with (
        pytest.raises(AlreadyExists, match="certificate already exists"),
        store.transaction() as tx,
    ):
        tx.add_certificates([certificate(), certificate(existing.serial)])
    with store.read() as tx:
        assert tx.certificate_counts(T0)["valid"] == 1


def test_list_pages_by_serial_with_filters(store: Store) -> None:
    web1 = [certificate(node_name="web-1") for _ in range(5)]
    web2 = [certificate(node_name="web-2", spiffe_id=f"{TD}/svc/db") for _ in range(4)]
    with store.transaction() as tx:
        tx.add_certificates(web1 + web2)
    with store.read() as tx:
        seen: list[str] = []
        after: str | None = None
        while page := tx.list_certificates(limit=2, after=after):
            seen += [c.serial for c in page]
            after = page[-1].serial
        assert seen == sorted(c.serial for c in web1 + web2)
        assert {c.serial for c in tx.list_certificates(node_name="web-1", limit=50)} == {
            c.serial for c in web1
        }
        assert {c.serial for c in tx.list_certificates(spiffe_id=f"{TD}/svc/db", limit=50)} == {
            c.serial for c in web2
        }
        assert tx.list_certificates(node_name="web-1", spiffe_id=f"{TD}/svc/db", limit=5) == []


def test_revoke_is_idempotent_and_bumps_the_bundle_version_once(store: Store) -> None:
    record = certificate()
    with store.transaction() as tx:
        tx.add_certificates([record])
        start = tx.bundle_version()
    with store.transaction() as tx:
        revoked = tx.revoke_certificate(record.serial, T0 + 10, "key compromise")
    assert (revoked.revoked_at, revoked.revocation_reason) == (T0 + 10, "key compromise")
    assert revoked.status(T0 + 11) == "revoked"
    with store.transaction() as tx:
        again = tx.revoke_certificate(record.serial, T0 + 20, "other")
        assert again == revoked
        assert tx.bundle_version() == start + 1
        with pytest.raises(NotFound, match="certificate 00 is not known"):
            tx.revoke_certificate("00", T0, "x")


def test_revoke_node_certificates_takes_only_live_ones(store: Store) -> None:
    live = [certificate(node_name="web-1") for _ in range(3)]
    expired = certificate(node_name="web-1", not_after=T0 - 1)
    already = certificate(node_name="web-1")
    other_node = certificate(node_name="web-2")
    with store.transaction() as tx:
        tx.add_certificates([*live, expired, already, other_node])
        tx.revoke_certificate(already.serial, T0, "superseded")
        version = tx.bundle_version()
    with store.transaction() as tx:
        serials = tx.revoke_node_certificates("web-1", T0 + 5, "node banned")
        assert serials == sorted(c.serial for c in live)
        assert tx.bundle_version() == version + 1
        assert tx.revoke_node_certificates("web-1", T0 + 6, "node banned") == []
        assert tx.bundle_version() == version + 1
    with store.read() as tx:
        revoked = {c.serial: c for c in tx.revoked_unexpired(T0 + 5)}
        untouched = tx.get_certificate(other_node.serial)
    assert sorted(revoked) == sorted([*serials, already.serial])
    assert revoked[already.serial].revocation_reason == "superseded"
    assert revoked[already.serial].revoked_at == T0
    assert {revoked[s].revocation_reason for s in serials} == {"node banned"}
    assert {revoked[s].revoked_at for s in serials} == {T0 + 5}
    assert untouched is not None
    assert untouched.revoked_at is None


def test_counts_and_revocation_list_follow_time(store: Store) -> None:
    short = certificate(not_after=T0 + 100)
    long = certificate(not_after=T0 + 1000)
    revoked_short = certificate(not_after=T0 + 100)
    with store.transaction() as tx:
        tx.add_certificates([short, long, revoked_short])
        tx.revoke_certificate(revoked_short.serial, T0, "test")
        assert tx.certificate_counts(T0) == {"valid": 2, "expired": 0, "revoked": 1}
        assert tx.certificate_counts(T0 + 100) == {"valid": 1, "expired": 1, "revoked": 1}
        assert [c.serial for c in tx.revoked_unexpired(T0 + 99)] == [revoked_short.serial]
        assert tx.revoked_unexpired(T0 + 100) == []


def test_counts_of_an_empty_table_are_zero(store: Store) -> None:
    with store.read() as tx:
        assert tx.certificate_counts(T0) == {"valid": 0, "expired": 0, "revoked": 0}


def test_prune_deletes_long_expired_records(store: Store) -> None:
    old, recent = certificate(not_after=T0 - 1000), certificate(not_after=T0 - 10)
    with store.transaction() as tx:
        tx.add_certificates([old, recent])
        assert tx.prune_certificates(expired_before=T0 - 100) == 1
        assert tx.get_certificate(old.serial) is None
        assert tx.get_certificate(recent.serial) == recent


def test_prune_in_chunks_takes_the_oldest_first(store: Store) -> None:
    records = [certificate(not_after=T0 - 1000 + i) for i in range(5)]
    recent = certificate(not_after=T0 - 10)
    with store.transaction() as tx:
        tx.add_certificates([*records, recent])
    with store.transaction() as tx:
        assert tx.prune_certificates(expired_before=T0 - 100, limit=2) == 2
    with store.read() as tx:
        left = [r.serial for r in records if tx.get_certificate(r.serial) is not None]
    assert left == [r.serial for r in records[2:]]
    with store.transaction() as tx:
        assert tx.prune_certificates(expired_before=T0 - 100, limit=2) == 2
        assert tx.prune_certificates(expired_before=T0 - 100, limit=2) == 1
        assert tx.prune_certificates(expired_before=T0 - 100, limit=2) == 0
        assert tx.get_certificate(recent.serial) == recent
