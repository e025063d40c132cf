"""Pure decisions of the lifecycle: when a certificate is renewed, which entries are due for
a new certificate, and what changed between two listings of the node's registration
entries."""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from meshtls.identity.rotation import renewal_time
from sidecar.identity.model import Entry, WorkloadIdentity

# Identities due within this window of the first due one join its SignIdentities batch.
BATCH_WINDOW_SECONDS = 60.0
# The CA may cap a batch; larger sets are split into batches of this size.
MAX_BATCH = 100


def schedule_renewal(
    not_before: float,
    not_after: float,
    now: float,
    *,
    fraction: float,
    jitter: float,
    fresh: bool,
    rng: random.Random | None = None,
) -> float:
    """When to renew a certificate valid from `not_before` to `not_after`.

    At `fraction` of its lifetime, +-`jitter` of it (half-life +-10 % by default). A
    `fresh` certificate (just received) that is already past that point (our clock runs
    ahead of the CA's, or it was backdated more than its lifetime allows) is renewed at the
    same fraction of what is left instead, so that a new certificate is never due at once,
    which would loop. A certificate loaded from disk keeps its plain point: if that has
    passed, it is due now.
    """
    at = renewal_time(not_before, not_after, fraction=fraction, jitter=jitter, rng=rng)
    if fresh and at <= now < not_after:
        at = renewal_time(now, not_after, fraction=fraction, jitter=jitter, rng=rng)
    return at


@dataclass(frozen=True)
class EntryChanges:
    removed: tuple[str, ...]  # entry ids whose identity must be dropped
    resign: tuple[str, ...]  # entry ids whose identity must be signed again now

    @property
    def empty(self) -> bool:
        return not self.removed and not self.resign


def diff_entries(
    entries: Mapping[str, Entry], identities: Mapping[str, WorkloadIdentity]
) -> EntryChanges:
    """Identities to drop (entry gone or now for another SPIFFE ID) or to sign again
    (DNS names or TTL changed)."""
    removed: list[str] = []
    resign: list[str] = []
    for entry_id, ident in identities.items():
        entry = entries.get(entry_id)
        if entry is None or entry.spiffe_id != ident.entry.spiffe_id:
            removed.append(entry_id)
        elif (entry.dns_names, entry.ttl_seconds) != (
            ident.entry.dns_names,
            ident.entry.ttl_seconds,
        ):
            resign.append(entry_id)
    return EntryChanges(tuple(removed), tuple(resign))


def due_entries(
    entries: Mapping[str, Entry],
    identities: Mapping[str, WorkloadIdentity],
    now: float,
    *,
    forced: Collection[str] = (),
    revoked: Collection[str] = (),
) -> list[Entry]:
    """Entries needing a certificate now, plus those due soon enough to batch with them."""
    due: list[Entry] = []
    later: list[Entry] = []
    for entry in entries.values():
        ident = identities.get(entry.id)
        if (
            ident is None
            or entry.id in forced
            or now >= ident.renew_at
            or ident.svid.serial in revoked
        ):
            due.append(entry)
        elif ident.renew_at <= now + BATCH_WINDOW_SECONDS:
            later.append(entry)
    return due + later if due else []


def batches(entries: list[Entry], size: int = MAX_BATCH) -> list[list[Entry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]
