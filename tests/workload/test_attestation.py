"""Workload attestation: the selectors of a caller and which identities it receives."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import time

from sidecar.identity.model import Snapshot, WorkloadIdentity
from sidecar.workload_api.attestation import Caller, Policy, attest
from sidecar.workload_api.unixgrpc import PeerCredentials
from tests.sidecar.helpers import make_bundle, make_identity
from tests.support.pki import ThrowawayCA

ROOT = ThrowawayCA.root()


def ident(spiffe_id: str, entry_id: str, *selectors: str, **times: float) -> WorkloadIdentity:
    made = make_identity(ROOT, spiffe_id, entry_id, **times)
    return dataclasses.replace(made, entry=dataclasses.replace(made.entry, selectors=selectors))


def snapshot(*idents: WorkloadIdentity, revoked: frozenset[str] = frozenset()) -> Snapshot:
    return Snapshot.build(1, None, make_bundle(ROOT), {i.entry.id: i for i in idents}, revoked)


def caller(uid: int, gid: int, *names: str) -> Caller:
    base = {f"unix:uid:{uid}", f"unix:gid:{gid}"}
    return Caller(PeerCredentials(1234, uid, gid), frozenset(base | set(names)))


def ids(idents: tuple[WorkloadIdentity, ...]) -> list[str]:
    return [str(i.svid.spiffe_id) for i in idents]


def test_attest_derives_uid_gid_and_names_from_the_host_databases() -> None:
    me = attest(PeerCredentials(os.getpid(), os.getuid(), os.getgid()))
    assert f"unix:uid:{os.getuid()}" in me.selectors
    assert f"unix:gid:{os.getgid()}" in me.selectors
    assert f"unix:user:{pwd.getpwuid(os.getuid()).pw_name}" in me.selectors
    assert f"unix:group:{grp.getgrgid(os.getgid()).gr_name}" in me.selectors
    unnamed = attest(PeerCredentials(1, 987654, 987654))
    assert unnamed.selectors == {"unix:uid:987654", "unix:gid:987654"}


def test_every_selector_of_an_entry_must_match() -> None:
    policy = Policy()
    snap = snapshot(
        ident("spiffe://example.org/a", "a", "unix:uid:1000"),
        ident("spiffe://example.org/b", "b", "unix:uid:1000", "unix:gid:50"),
        ident("spiffe://example.org/c", "c", "unix:user:web"),
        ident("spiffe://example.org/k8s", "k", "k8s:ns:web"),
    )
    now = time.time()
    assert ids(policy.entitled(snap, caller(1000, 50), now)) == [
        "spiffe://example.org/a",
        "spiffe://example.org/b",
    ]
    assert ids(policy.entitled(snap, caller(1000, 51), now)) == ["spiffe://example.org/a"]
    assert ids(policy.entitled(snap, caller(7, 7, "unix:user:web"), now)) == [
        "spiffe://example.org/c"
    ]
    assert policy.entitled(snap, caller(7, 7), now) == ()


def test_entries_without_selectors_match_nobody_unless_allowed() -> None:
    snap = snapshot(ident("spiffe://example.org/open", "o"))
    now = time.time()
    assert Policy().entitled(snap, caller(1000, 1000), now) == ()
    allowed = Policy(allow_entries_without_selectors=True).entitled(snap, caller(5, 5), now)
    assert ids(allowed) == ["spiffe://example.org/open"]


def test_expired_and_revoked_certificates_are_left_out() -> None:
    now = time.time()
    live = ident("spiffe://example.org/live", "l", "unix:uid:1")
    expired = ident(
        "spiffe://example.org/old", "e", "unix:uid:1", not_before=now - 7200, not_after=now - 60
    )
    revoked = ident("spiffe://example.org/revoked", "r", "unix:uid:1")
    snap = snapshot(live, expired, revoked, revoked=frozenset({revoked.svid.serial}))
    assert ids(Policy().entitled(snap, caller(1, 1), now)) == ["spiffe://example.org/live"]


def test_one_spiffe_id_is_served_once_freshest_first_and_in_a_stable_order() -> None:
    now = time.time()
    older = ident("spiffe://example.org/z", "z1", "unix:uid:1", not_after=now + 600)
    newer = ident("spiffe://example.org/z", "z2", "unix:uid:1", not_after=now + 1200)
    first = ident("spiffe://example.org/a", "a", "unix:uid:1")
    got = Policy().entitled(snapshot(older, newer, first), caller(1, 1), now)
    assert ids(got) == ["spiffe://example.org/a", "spiffe://example.org/z"]
    assert got[1].svid.serial == newer.svid.serial


def test_nothing_is_served_before_a_bundle_is_held() -> None:
    one = ident("spiffe://example.org/a", "a", "unix:uid:1")
    snap = Snapshot.build(1, None, None, {"a": one})
    assert Policy().entitled(snap, caller(1, 1), time.time()) == ()
