"""Authorities: storage of keys and chains, ordering, state changes, bundle version."""

from __future__ import annotations

import pytest

from ca_server.db import Store
from ca_server.errors import AlreadyExists, InvalidRequest, NotFound
from tests.db.builders import T0, authority


def test_add_and_list_in_creation_order(store: Store) -> None:
    root = authority("root-1", created_at=T0)
    intermediate = authority(
        "int-1",
        kind="intermediate",
        parent_id="root-1",
        created_at=T0 + 1,
        chain_pem="-----BEGIN CERTIFICATE-----\nUP\n-----END CERTIFICATE-----\n",
    )
    upstream_root = authority("up-root", encrypted_key=None, upstream=True, created_at=T0 - 5)
    with store.transaction() as tx:
        start = tx.bundle_version()
        for item in (intermediate, root, upstream_root):
            tx.add_authority(item)
        assert tx.bundle_version() == start + 3
    with store.read() as tx:
        listed = tx.list_authorities()
        assert listed == [upstream_root, root, intermediate]
        assert listed[1].encrypted_key == root.encrypted_key
        assert isinstance(listed[1].encrypted_key, bytes)
        assert tx.get_authority("missing") is None


def test_duplicate_id_is_already_exists(store: Store) -> None:
    with store.transaction() as tx:
        tx.add_authority(authority("root-1"))
        with pytest.raises(AlreadyExists, match="authority root-1 already exists"):
            tx.add_authority(authority("root-1"))


def test_state_changes_are_recorded_and_bump_the_version(store: Store) -> None:
    with store.transaction() as tx:
        tx.add_authority(authority("int-2", kind="intermediate", state="prepared"))
        version = tx.bundle_version()
    with store.transaction() as tx:
        tx.set_authority_state("int-2", "active", T0 + 50)
        assert tx.bundle_version() == version + 1
        tx.set_authority_state("int-2", "active", T0 + 60)
        assert tx.bundle_version() == version + 1
        assert tx.authority_state_changed_at("int-2") == T0 + 50
        with pytest.raises(NotFound, match="authority nope is not known"):
            tx.set_authority_state("nope", "retired", T0)
        with pytest.raises(InvalidRequest):
            tx.set_authority_state("int-2", "deleted", T0)  # type: ignore[arg-type]
    with store.read() as tx:
        (stored,) = tx.list_authorities()
    assert stored.state == "active"


def test_intermediate_states_are_the_intermediates_ids_and_states_only(store: Store) -> None:
    with store.read() as tx:
        assert tx.intermediate_states() == {}
    with store.transaction() as tx:
        tx.add_authority(authority("root-1"))
        tx.add_authority(authority("root-2", state="prepared"))
        tx.add_authority(authority("int-1", kind="intermediate", parent_id="root-1"))
        tx.add_authority(
            authority("int-2", kind="intermediate", state="prepared", parent_id="root-2")
        )
        tx.add_authority(
            authority("int-0", kind="intermediate", state="retired", parent_id="root-1")
        )
    with store.transaction() as tx:
        tx.set_authority_state("int-2", "active", T0 + 10)
        tx.set_authority_state("int-1", "retired", T0 + 10)
    with store.read() as tx:
        assert tx.intermediate_states() == {
            "int-0": "retired",
            "int-1": "retired",
            "int-2": "active",
        }
