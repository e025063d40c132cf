"""Registration entries: uniqueness per (SPIFFE ID, node), filters, paging, delete."""

from __future__ import annotations

import pytest

from ca_server.db import Store
from ca_server.errors import AlreadyExists, NotFound
from tests.db.builders import TD, entry


def test_add_get_and_round_trip_of_lists(store: Store) -> None:
    created = entry(dns_names=("a.internal", "b.internal"), selectors=("k8s:ns:x", "uid:1"))
    with store.transaction() as tx:
        tx.add_entry(created)
    with store.read() as tx:
        assert tx.get_entry(created.id) == created
        assert tx.get_entry("0" * 32) is None


def test_same_spiffe_id_on_same_node_is_already_exists_and_tx_stays_usable(
    store: Store,
) -> None:
    first = entry("svc/api", "web-1")
    with store.transaction() as tx:
        tx.add_entry(first)
        with pytest.raises(AlreadyExists) as duplicate:
            tx.add_entry(entry("svc/api", "web-1"))
        assert duplicate.value.message == (
            f"a registration entry for {TD}/svc/api on node 'web-1' already exists"
        )
        with pytest.raises(AlreadyExists, match=f"registration entry id {first.id} already"):
            tx.add_entry(entry("svc/other", "web-1", id=first.id))
        # The failed inserts ran in savepoints: the transaction carries on.
        tx.add_entry(entry("svc/api", "web-2"))
    with store.read() as tx:
        assert tx.count_entries() == 2


def test_filters_paging_and_entries_for_node(store: Store) -> None:
    created = [entry(f"svc/s{i}", "web-1" if i % 2 else "web-2") for i in range(9)]
    created.append(entry("svc/s1", "web-2"))
    with store.transaction() as tx:
        for item in created:
            tx.add_entry(item)

    with store.read() as tx:
        everything: list[str] = []
        after: str | None = None
        while page := tx.list_entries(limit=4, after=after):
            everything += [e.id for e in page]
            after = page[-1].id
        assert everything == sorted(e.id for e in created)

        on_web1 = tx.list_entries(node_name="web-1", limit=100)
        assert {e.id for e in on_web1} == {e.id for e in created if e.node_name == "web-1"}
        by_id = tx.list_entries(spiffe_id=f"{TD}/svc/s1", limit=100)
        assert {e.node_name for e in by_id} == {"web-1", "web-2"}
        both = tx.list_entries(node_name="web-2", spiffe_id=f"{TD}/svc/s1", limit=100)
        assert [e.id for e in both] == [created[-1].id]

        for_node = tx.entries_for_node("web-2")
        assert [e.spiffe_id for e in for_node] == sorted(
            e.spiffe_id for e in created if e.node_name == "web-2"
        )
        assert tx.entries_for_node("nobody") == []
        assert tx.count_entries() == 10


def test_delete_returns_the_entry_and_unknown_is_not_found(store: Store) -> None:
    created = entry()
    with store.transaction() as tx:
        tx.add_entry(created)
    with store.transaction() as tx:
        assert tx.delete_entry(created.id) == created
    with store.transaction() as tx:
        with pytest.raises(NotFound, match=f"registration entry {created.id} is not known"):
            tx.delete_entry(created.id)
        assert tx.get_entry(created.id) is None
