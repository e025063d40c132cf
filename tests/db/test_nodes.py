"""Nodes: upsert, current certificate, last seen, ban, paging."""

from __future__ import annotations

import pytest

from ca_server.db import Store
from ca_server.errors import InvalidRequest, NotFound
from tests.db.builders import T0, node


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
