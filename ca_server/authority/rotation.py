"""When the CA's authorities change: a pure function of the journal and the time.

Lifecycle of an intermediate (SPIRE's schedule): the next one is *prepared* at 1/2 of the
active one's lifetime and *activated* at 5/6; the old one is then *retired*. Intermediates
rotate under the same root, so peers' trust bundles do not change and nothing needs to
propagate.

Root rotation is one level up: once the active root is past half of its life, the next
preparation makes a new *generation* (a new root and an intermediate under it). The new
root enters the trust bundle the moment it is prepared, long before anything it signs is
used; at activation the old root is retired but stays in the bundle until every leaf signed
under it has expired (plus a grace period), and only then leaves it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ca_server.domain import Authority

PREPARE_AT = 1 / 2
ACTIVATE_AT = 5 / 6


@dataclass(frozen=True)
class RotationSettings:
    intermediate_ttl: float
    root_ttl: float
    # A retired root stays in the bundle this long after its last leaf expired.
    retired_grace: float = 3600.0
    # A prepared generation's root must have been published this long before activation
    # (so every sidecar holds it); an emergency activation ignores it.
    min_propagation: float = 60.0
    # Seconds a replica holds the rotation job (see the `rotation_lease` setting).
    lease: float = 300.0


@dataclass(frozen=True)
class Action:
    kind: Literal["prepare_intermediate", "prepare_generation", "activate"]
    reason: str
    # prepare_intermediate: the root to sign under; activate: the prepared intermediate.
    authority_id: str | None = None


def _fraction(a: Authority, now: float) -> float:
    life = a.not_after - a.not_before
    return (now - a.not_before) / life if life > 0 else 1.0


def active_pair(authorities: Sequence[Authority]) -> tuple[Authority | None, Authority | None]:
    """(active intermediate, its root)."""
    by_id = {a.id: a for a in authorities}
    for a in authorities:
        if a.kind == "intermediate" and a.state == "active":
            return a, by_id.get(a.parent_id or "")
    return None, None


def prepared_intermediate(authorities: Sequence[Authority]) -> Authority | None:
    found = [a for a in authorities if a.kind == "intermediate" and a.state == "prepared"]
    return max(found, key=lambda a: a.created_at) if found else None


def plan(
    authorities: Sequence[Authority],
    now: float,
    settings: RotationSettings,
    *,
    requested: bool = False,
    immediate: bool = False,
) -> list[Action]:
    """What to do now; [] when nothing is due. `requested` (an operator's rotate): prepare
    now if nothing is prepared, and activate once it has propagated. `immediate`: also
    activate at once, propagated or not."""
    force = requested or immediate
    active, root = active_pair(authorities)
    if active is None or root is None:
        return []
    if active.upstream:
        return []  # the operator rotates an upstream intermediate (see expiry warnings)
    prepared = prepared_intermediate(authorities)
    by_id = {a.id: a for a in authorities}
    expired = now >= active.not_after
    if prepared is None:
        if force or expired or _fraction(active, now) >= PREPARE_AT:
            why = (
                "requested"
                if force
                else ("active intermediate expired" if expired else "half-life")
            )
            if (
                _fraction(root, now) >= PREPARE_AT
                or root.not_after - now < 2 * settings.intermediate_ttl
            ):
                return [Action("prepare_generation", f"{why}; root past half-life")]
            return [Action("prepare_intermediate", why, root.id)]
        return []
    new_root = by_id.get(prepared.parent_id or "")
    published_for = now - (
        new_root.created_at if new_root and new_root.state == "prepared" else prepared.created_at
    )
    propagated = published_for >= settings.min_propagation
    if expired:
        return [Action("activate", "active intermediate expired (emergency)", prepared.id)]
    if immediate:
        return [Action("activate", "forced at once, before propagation", prepared.id)]
    if (force and propagated) or (_fraction(active, now) >= ACTIVATE_AT and propagated):
        return [Action("activate", "requested" if force else "5/6 of lifetime", prepared.id)]
    return []


def bundle_root_ids(
    authorities: Sequence[Authority],
    now: float,
    last_leaf_expiry: Mapping[str, float],
    grace: float,
) -> set[str]:
    """Roots every peer must trust now: prepared and active roots, and retired roots while
    a leaf signed under them may still be alive (`last_leaf_expiry`: intermediate id ->
    latest NotAfter it signed) plus `grace`."""
    intermediates_of: dict[str, list[str]] = {}
    for a in authorities:
        if a.kind == "intermediate" and a.parent_id:
            intermediates_of.setdefault(a.parent_id, []).append(a.id)
    keep = set()
    for a in authorities:
        if a.kind != "root":
            continue
        if a.state != "retired":
            keep.add(a.id)
            continue
        latest = max(
            (last_leaf_expiry.get(i, 0.0) for i in intermediates_of.get(a.id, [])), default=0.0
        )
        if now < latest + grace and now < a.not_after:
            keep.add(a.id)
    return keep
