"""The state directory: round trip, permissions, and corrupt or foreign content reported
and set aside instead of crashing the sidecar."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from meshtls.identity.ids import SpiffeId
from sidecar.errors import StateError
from sidecar.identity.ca_client import CAClient
from sidecar.identity.holder import Holder
from sidecar.identity.model import Entry, NodeIdentity
from sidecar.identity.state import StateStore
from tests.sidecar.helpers import (
    config_from,
    make_bundle,
    make_identity,
    make_svid,
    sidecar_document,
)
from tests.support.pki import ThrowawayCA

NODE_ID = "spiffe://example.org/meshtls/node/web-1"
WEB = "spiffe://example.org/svc/web"


@pytest.fixture(scope="module")
def root() -> ThrowawayCA:
    return ThrowawayCA.root()


@pytest.fixture(scope="module")
def issuer(root: ThrowawayCA) -> ThrowawayCA:
    return root.intermediate()


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    s = StateStore(tmp_path / "state", "example.org", "web-1")
    s.prepare()
    return s


def fill(store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA) -> None:
    bundle = make_bundle(root, version=7)
    node = NodeIdentity("web-1", make_svid(issuer, NODE_ID), 1000.0, 2000.0)
    web = make_identity(issuer, WEB, "e-web", issued_at=1234.5)
    store.save_bundle(bundle)
    store.save_node(node)
    db = Entry("e-db", SpiffeId.parse("spiffe://example.org/svc/db"), ("db.internal",), 600)
    store.save_entries((web.entry, db))
    store.save_identity(web)


def test_round_trip(store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA) -> None:
    fill(store, root, issuer)
    state = store.load(time.time())
    assert state.problems == []
    assert state.bundle is not None
    assert state.bundle.version == 7
    assert state.bundle.roots == (root.cert,)
    assert state.node is not None
    assert str(state.node.svid.spiffe_id) == NODE_ID
    assert state.node.issued_at == 1000.0
    assert state.entries is not None
    assert [e.id for e in state.entries] == ["e-web", "e-db"]
    assert state.entries[1].dns_names == ("db.internal",)
    entry, stored = state.identities["e-web"]
    assert str(entry.spiffe_id) == WEB
    assert stored.issued_at == 1234.5
    assert stored.svid.key.private_numbers() is not None


def test_permissions(store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA) -> None:
    fill(store, root, issuer)
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.identities_dir).st_mode) == 0o700
    files = list(store.directory.rglob("*.json"))
    assert len(files) == 4
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_prepare_tightens_an_existing_directory(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    StateStore(directory, "example.org", "web-1").prepare()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_prepare_reports_an_unusable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="cannot use state directory"):
        StateStore(blocker / "state", "example.org", "web-1").prepare()


def test_empty_directory_loads_nothing(store: StateStore) -> None:
    state = store.load(time.time())
    assert (state.bundle, state.node, state.entries, state.identities) == (None, None, None, {})
    assert state.problems == []


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"format": 99}', b'{"format": 1, "name": "web-1"}', b""],
    ids=["garbage", "not-object", "future-format", "partial", "empty"],
)
def test_corrupt_node_file_is_quarantined(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA, content: bytes
) -> None:
    fill(store, root, issuer)
    (store.directory / "node.json").write_bytes(content)
    state = store.load(time.time())
    assert state.node is None
    assert len(state.problems) == 1
    assert "node.json" in state.problems[0]
    assert (store.directory / "node.json.corrupt").read_bytes() == content
    assert not (store.directory / "node.json").exists()
    # Everything else still loads.
    assert "e-web" in state.identities
    # And the next load is quiet.
    assert store.load(time.time()).problems == []


def test_truncated_identity_is_quarantined(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    (path,) = store.identities_dir.glob("*.json")
    path.write_bytes(path.read_bytes()[:200])
    state = store.load(time.time())
    assert state.identities == {}
    assert any(path.name in p for p in state.problems)


def test_corrupt_bundle_drops_everything_that_depends_on_it(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    (store.directory / "bundle.json").write_text('{"format": 1, "version": "x"}')
    state = store.load(time.time())
    assert state.bundle is None
    assert state.node is None
    assert state.identities == {}
    assert any("no usable trust bundle" in p for p in state.problems)


def test_certificate_from_another_ca_is_refused(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    stranger = ThrowawayCA.root(common_name="someone else")
    store.save_identity(make_identity(stranger, WEB, "e-web"))
    state = store.load(time.time())
    assert state.identities == {}
    assert any("does not lead to a root of trust bundle" in p for p in state.problems)


def test_key_that_does_not_match_the_certificate_is_refused(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    (path,) = store.identities_dir.glob("*.json")
    doc = json.loads(path.read_text())
    other = make_identity(issuer, WEB, "e-web")
    doc["key_pem"] = other.svid.key_pem().decode()
    path.write_text(json.dumps(doc))
    state = store.load(time.time())
    assert state.identities == {}
    assert any("does not certify our private key" in p for p in state.problems)


def test_wrong_spiffe_id_is_refused(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    (path,) = store.identities_dir.glob("*.json")
    doc = json.loads(path.read_text())
    doc["entry"]["spiffe_id"] = "spiffe://example.org/svc/other"
    doc["spiffe_id"] = "spiffe://example.org/svc/other"
    path.write_text(json.dumps(doc))
    state = store.load(time.time())
    assert state.identities == {}
    assert any("expected spiffe://example.org/svc/other" in p for p in state.problems)


def test_expired_identity_is_dropped_but_an_expired_node_is_returned(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    later = time.time() + 2 * 86400  # every leaf made by the throwaway CA lives one day
    state = store.load(later)
    assert state.identities == {}
    assert list(store.identities_dir.glob("*.json")) == []
    assert state.node is not None  # the manager reports its expiry
    assert state.node.svid.expired(later)


def test_node_of_another_name_is_ignored(
    tmp_path: Path, store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    other = StateStore(store.directory, "example.org", "web-2")
    state = other.load(time.time())
    assert state.node is None
    assert any("is for node 'web-1'" in p for p in state.problems)


def test_remove_identity_and_clear_node(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    store.remove_identity("e-web")
    store.remove_identity("e-web")  # twice is fine
    store.clear_node()
    state = store.load(time.time())
    assert state.identities == {}
    assert state.node is None


def test_entry_ids_that_are_not_file_names_are_stored_safely(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    store.save_identity(make_identity(issuer, WEB, "../../etc/passwd"))
    assert all(p.parent == store.identities_dir for p in store.identities_dir.iterdir())
    state = store.load(time.time())
    assert "../../etc/passwd" in state.identities


def test_unreadable_entry_is_reported_not_raised(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    fill(store, root, issuer)
    (store.directory / "entries.json").unlink()
    (store.directory / "entries.json").mkdir()  # reading it fails with an OS error
    state = store.load(time.time())
    assert state.entries is None
    assert any("entries.json" in p for p in state.problems)
    assert state.node is not None


def test_failing_writes_raise_state_error_naming_the_path(
    store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    web = make_identity(issuer, WEB, "e-web")
    (store.identities_dir / "e-web.json").mkdir()  # the rename onto it fails
    with pytest.raises(StateError, match=r"cannot write .*e-web\.json"):
        store.save_identity(web)


async def test_holder_keeps_serving_when_the_disk_refuses_writes(
    tmp_path: Path, store: StateStore, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(root.cert_pem)
    doc = sidecar_document(
        tmp_path, agent_address="127.0.0.1:1", enroll_address="127.0.0.1:2", bundle_path=bundle
    )
    client = CAClient(config_from(tmp_path, doc).ca)
    holder = Holder("example.org", "web-1", client, store)
    web = make_identity(issuer, WEB, "e-web")
    (store.identities_dir / "e-web.json").mkdir()
    holder.put_identity(web)
    assert holder.identities["e-web"] is web
    assert holder.persist_failures == 1
    assert holder.dirty
    await client.close()
