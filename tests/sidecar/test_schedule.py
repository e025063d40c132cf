"""Renewal scheduling (half-life +-10 %), the clock-skew guard, and which entries are due."""

from __future__ import annotations

import random

import pytest

from meshtls.identity.ids import SpiffeId
from sidecar.identity.model import Entry, WorkloadIdentity
from sidecar.identity.workloads import (
    BATCH_WINDOW_SECONDS,
    batches,
    diff_entries,
    due_entries,
    schedule_renewal,
)
from tests.sidecar.helpers import make_identity
from tests.support.pki import ThrowawayCA

HOUR = 3600.0


def test_renewal_falls_at_half_life_within_ten_percent() -> None:
    rng = random.Random(7)
    nb, na = 1_000_000.0, 1_000_000.0 + HOUR
    points = [
        schedule_renewal(nb, na, nb, fraction=0.5, jitter=0.1, fresh=True, rng=rng)
        for _ in range(2000)
    ]
    assert min(points) >= nb + 0.4 * HOUR
    assert max(points) <= nb + 0.6 * HOUR
    # Jitter really spreads them (a fleet does not renew at once).
    assert max(points) - min(points) > 0.15 * HOUR
    assert abs(sum(points) / len(points) - (nb + 0.5 * HOUR)) < 0.01 * HOUR


def test_no_jitter_is_exactly_the_fraction() -> None:
    at = schedule_renewal(0.0, 100.0, 0.0, fraction=0.7, jitter=0.0, fresh=True)
    assert at == pytest.approx(70.0)


def test_fresh_certificate_past_its_point_renews_at_the_same_fraction_of_what_is_left() -> None:
    # Our clock is 40 minutes ahead of the CA's: the plain point is already behind us.
    nb, na = 0.0, HOUR
    now = 40 * 60.0
    at = schedule_renewal(nb, na, now, fraction=0.5, jitter=0.0, fresh=True)
    assert at == pytest.approx(now + (na - now) / 2)
    assert at > now


def test_loaded_certificate_past_its_point_is_due_now() -> None:
    at = schedule_renewal(0.0, HOUR, 40 * 60.0, fraction=0.5, jitter=0.0, fresh=False)
    assert at == pytest.approx(HOUR / 2)


@pytest.fixture(scope="module")
def issuer() -> ThrowawayCA:
    return ThrowawayCA.root().intermediate()


def with_renew_at(ident: WorkloadIdentity, renew_at: float) -> WorkloadIdentity:
    return WorkloadIdentity(ident.entry, ident.svid, ident.issued_at, renew_at)


def test_due_entries(issuer: ThrowawayCA) -> None:
    now = 10_000.0
    a = with_renew_at(make_identity(issuer, "spiffe://example.org/a", "a"), now - 1)
    b = with_renew_at(make_identity(issuer, "spiffe://example.org/b", "b"), now + 30)
    c = with_renew_at(make_identity(issuer, "spiffe://example.org/c", "c"), now + 10 * HOUR)
    new = Entry("d", SpiffeId.parse("spiffe://example.org/d"))
    entries = {e.id: e for e in (a.entry, b.entry, c.entry, new)}
    held = {w.entry.id: w for w in (a, b, c)}

    due = [e.id for e in due_entries(entries, held, now)]
    # a is due, d has no certificate, b is due within the batch window and joins them.
    assert sorted(due) == ["a", "b", "d"]
    assert BATCH_WINDOW_SECONDS > 30

    # Nothing due: the one due "soon" does not trigger a call on its own.
    quiet = {k: v for k, v in entries.items() if k in {"b", "c"}}
    assert due_entries(quiet, held, now) == []
    # Forced (bundle change, changed entry) and revoked ones are due at once.
    assert [e.id for e in due_entries(quiet, held, now, forced={"c"})] == ["c", "b"]
    assert [e.id for e in due_entries(quiet, held, now, revoked={c.svid.serial})] == ["c", "b"]


def test_diff_entries(issuer: ThrowawayCA) -> None:
    a = make_identity(issuer, "spiffe://example.org/a", "a")
    b = make_identity(issuer, "spiffe://example.org/b", "b")
    c = make_identity(issuer, "spiffe://example.org/c", "c")
    held = {w.entry.id: w for w in (a, b, c)}
    listed = {
        # a unchanged; b now names another SPIFFE ID; c got a DNS name; "d" is new
        "a": a.entry,
        "b": Entry("b", SpiffeId.parse("spiffe://example.org/other"), (), 3600),
        "c": Entry("c", c.entry.spiffe_id, ("c.internal",), 3600),
        "d": Entry("d", SpiffeId.parse("spiffe://example.org/d")),
    }
    changes = diff_entries(listed, held)
    assert changes.removed == ("b",)
    assert changes.resign == ("c",)
    gone = diff_entries({}, held)
    assert sorted(gone.removed) == ["a", "b", "c"]
    assert diff_entries({"a": a.entry}, {"a": a}).empty


def test_batches() -> None:
    entries = [Entry(str(i), SpiffeId.parse(f"spiffe://example.org/e{i}")) for i in range(250)]
    sizes = [len(b) for b in batches(entries)]
    assert sizes == [100, 100, 50]
    assert batches([]) == []
