"""Nodes: upsert, current certificate, last seen, ban, paging, and the access version their
changes (and entry changes) bump."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ca_server.db import Store
from ca_server.db.tx import Tx
from ca_server.errors import InvalidRequest, NotFound
from tests.db.builders import T0, entry, node


def test_upsert_inserts_then_replaces_every_field(store: Store) -> None:
    with store.transaction() as tx:
        tx.upsert_node(node("web-1"))
    replaced = node(
        "web-1",
        spiffe_id="spiffe://example.org/meshtls/node/web-1b",
        current_serial="ab12",
        enrolled_at=T0 + 100,
        last_seen_at=T0 + 101,
        certificate_expires_at=T0 + 3700,
    )
    with store.transaction() as tx:
        tx.upsert_node(replaced)
    with store.read() as tx:
        assert tx.get_node("web-1") == replaced
        assert tx.get_node("web-2") is None
        assert tx.count_nodes() == 1


def test_set_node_certificate_and_touch(store: Store) -> None:
    with store.transaction() as tx:
        tx.upsert_node(node("web-1"))
        tx.set_node_certificate("web-1", "c0ffee", T0 + 3600, now=T0 + 5)
    with store.read() as tx:
        stored = tx.get_node("web-1")
    assert stored is not None
    assert (stored.current_serial, stored.certificate_expires_at) == ("c0ffee", T0 + 3600)
    assert stored.last_seen_at == T0 + 5

    with store.transaction() as tx:
        tx.touch_node("web-1", T0 + 50)
    with store.read() as tx:
        touched = tx.get_node("web-1")
    assert touched is not None
    assert touched.last_seen_at == T0 + 50
    assert touched.current_serial == "c0ffee"


def test_unknown_node_updates_are_not_found(store: Store) -> None:
    with store.transaction() as tx:
        with pytest.raises(NotFound, match="node 'ghost' is not known"):
            tx.set_node_certificate("ghost", "aa", T0, T0)
        with pytest.raises(NotFound):
            tx.touch_node("ghost", T0)
        with pytest.raises(NotFound):
            tx.ban_node("ghost", T0)


def test_ban_keeps_the_first_ban_time_and_upsert_active_clears_it(store: Store) -> None:
    with store.transaction() as tx:
        tx.upsert_node(node("web-1", current_serial="aa"))
        banned = tx.ban_node("web-1", T0 + 10)
    assert banned.status == "banned"
    assert banned.current_serial == "aa"
    with store.transaction() as tx:
        assert tx.ban_node("web-1", T0 + 20).status == "banned"
        assert tx.node_banned_at("web-1") == T0 + 10
        # Re-stating a banned node keeps its ban time; making it active clears it.
        tx.upsert_node(node("web-1", status="banned"))
        assert tx.node_banned_at("web-1") == T0 + 10
        tx.upsert_node(node("web-1", status="active"))
        assert tx.node_banned_at("web-1") is None
        assert tx.get_node("web-1") == node("web-1", status="active")


def test_list_nodes_pages_by_name(store: Store) -> None:
    names = [f"node-{i:02d}" for i in range(7)]
    with store.transaction() as tx:
        for name in reversed(names):
            tx.upsert_node(node(name))
    seen: list[str] = []
    after: str | None = None
    with store.read() as tx:
        while True:
            page = tx.list_nodes(limit=3, after=after)
            if not page:
                break
            assert len(page) <= 3
            seen += [n.name for n in page]
            after = page[-1].name
        assert tx.count_nodes() == 7
        with pytest.raises(InvalidRequest):
            tx.list_nodes(limit=0)
    assert seen == names


def test_every_change_to_who_may_do_what_bumps_the_access_version(store: Store) -> None:
    """Replicas drop their cached node and entry answers when the access version moves:
    every write that changes a ban, a current node certificate or an entry bumps it, in
    its own transaction; the rest (last seen, a pending renewal, reads) does not."""

    def version() -> int:
        with store.read() as tx:
            return tx.access_version()

    start = version()
    steps: list[tuple[str, Callable[[Tx], object], int]] = [
        ("enroll", lambda tx: tx.upsert_node(node("web-1")), 1),
        ("re-enroll", lambda tx: tx.set_node_certificate("web-1", "c0", T0 + 9, now=T0), 1),
        ("touch", lambda tx: tx.touch_node("web-1", now=T0 + 1), 0),
        ("renew", lambda tx: tx.set_node_pending_certificate("web-1", "c1", now=T0), 0),
        ("stale promote", lambda tx: tx.promote_node_certificate("web-1", "c9", T0, T0), 0),
        ("promote", lambda tx: tx.promote_node_certificate("web-1", "c1", T0 + 9, T0), 1),
        ("add entry", lambda tx: tx.add_entry(entry(id="e1", node_name="web-1")), 1),
        ("delete entry", lambda tx: tx.delete_entry("e1"), 1),
        ("ban", lambda tx: tx.ban_node("web-1", now=T0 + 2), 1),
    ]
    for what, change, bumps in steps:
        with store.transaction() as tx:
            change(tx)
        assert version() == start + bumps, what
        start = version()
    with store.transaction() as tx, pytest.raises(NotFound):
        tx.ban_node("nobody", now=T0)
    assert version() == start
    # Several changes in one transaction (the group commit's batches) bump it once, at the
    # end, so trust_state is the last row such a transaction locks.
    with store.transaction() as tx:
        tx.upsert_node(node("web-2"))
        tx.add_entry(entry(id="e2", node_name="web-2"))
        tx.ban_node("web-2", now=T0 + 3)
        assert tx.access_version() == start  # not yet
    assert version() == start + 1
