"""Writing one rotation step to the authority journal: each `authority.rotation.Action` the
policy planned (prepare an intermediate or a whole generation; activate a prepared
intermediate, retiring the authorities it replaces) becomes one committed transaction
with its audit events and a trust-change notification, so a replica that dies mid-way
leaves a journal the next lease holder completes. Also the one change no journal step
marks: a retired root leaving the bundle once its last leaf has expired.

What is due and when is decided elsewhere (`authority.rotation`, and the rotation job in
`services.authorities`); these functions only apply it."""

from __future__ import annotations

import logging

from ca_server.authority.kek import Kek
from ca_server.authority.keys import decrypt_private_key
from ca_server.authority.material import new_generation, new_intermediate
from ca_server.authority.rotation import Action, RotationSettings, bundle_root_ids
from ca_server.db.notify import notify_trust_changed
from ca_server.db.tx import Tx
from ca_server.domain import Authority
from ca_server.errors import FailedPrecondition
from ca_server.services.audit import event
from ca_server.services.context import CAContext
from meshtls.clock import utc
from meshtls.identity.x509 import fingerprint_sha256

log = logging.getLogger(__name__)


async def apply_action(
    ctx: CAContext,
    kek: Kek,
    settings: RotationSettings,
    action: Action,
    authorities: list[Authority],
    now: float,
) -> None:
    """Commit `action`, planned from `authorities` at `now`."""
    by_id = {a.id: a for a in authorities}
    td = ctx.config.trust_domain
    if action.kind == "prepare_intermediate":
        root = by_id[action.authority_id or ""]
        created = [
            new_intermediate(
                root,
                decrypt_private_key(root, kek),
                trust_domain=td,
                ttl=settings.intermediate_ttl,
                now=now,
                kek=kek,
            )
        ]
    elif action.kind == "prepare_generation":
        created = new_generation(
            td,
            root_ttl=settings.root_ttl,
            intermediate_ttl=settings.intermediate_ttl,
            now=now,
            kek=kek,
        )
    else:
        await _activate(ctx, by_id, action, now)
        return
    events = [
        event(
            now,
            "system",
            "authority.prepare",
            a.id,
            kind=a.kind,
            reason=action.reason,
            fingerprint=a.fingerprint_sha256,
            not_after=utc(a.not_after).isoformat(),
        )
        for a in created
    ]

    def add(tx: Tx) -> None:
        for a in created:
            tx.add_authority(a)
        notify_trust_changed(tx)

    await ctx.write(add, events)


async def _activate(
    ctx: CAContext, by_id: dict[str, Authority], action: Action, now: float
) -> None:
    prepared = by_id[action.authority_id or ""]
    new_root = by_id.get(prepared.parent_id or "")
    if new_root is None:
        raise FailedPrecondition(f"the root of prepared intermediate {prepared.id} is missing")
    changes: list[tuple[str, str]] = [(prepared.id, "active")]
    for a in by_id.values():
        if a.kind == "intermediate" and a.state == "active":
            changes.append((a.id, "retired"))
        if a.kind == "root" and a.state == "active" and a.id != new_root.id:
            changes.append((a.id, "retired"))
    if new_root.state == "prepared":
        changes.append((new_root.id, "active"))
    events = [
        event(
            now,
            "system",
            "authority.activate" if state == "active" else "authority.retire",
            authority_id,
            reason=action.reason,
        )
        for authority_id, state in changes
    ]

    def apply(tx: Tx) -> None:
        for authority_id, state in changes:
            tx.set_authority_state(authority_id, state, now)  # type: ignore[arg-type]
        notify_trust_changed(tx)

    await ctx.write(apply, events)
    log.warning(
        "signing authority rotated",
        extra={
            "activated": prepared.id,
            "reason": action.reason,
            "retired": [i for i, s in changes if s == "retired"],
        },
    )


async def unpublish_expired_roots(ctx: CAContext, retired_grace: float) -> bool:
    """A retired root leaves the bundle when its last leaf has expired: no journal change
    marks that moment, so bump the version to make every peer hear of it. True when the
    bundle this replica publishes has to change (the caller reloads)."""
    now = ctx.clock.now()

    def load(tx: Tx) -> tuple[list[Authority], dict[str, float]]:
        return tx.list_authorities(), tx.latest_expiry_by_issuer()

    authorities, expiry = await ctx.read(load)
    wanted = bundle_root_ids(authorities, now, expiry, retired_grace)
    published = {fingerprint_sha256(root) for root in ctx.trust.snapshot.roots}
    held = {a.id for a in authorities if a.kind == "root" and a.fingerprint_sha256 in published}
    if wanted == held:
        return False
    dropped = sorted(held - wanted)
    events = [
        event(
            now,
            "system",
            "authority.unpublish",
            root_id,
            reason="every leaf signed under this retired root has expired",
        )
        for root_id in dropped
    ]

    def bump(tx: Tx) -> None:
        tx.bump_bundle_version()
        notify_trust_changed(tx)

    await ctx.write(bump, events)
    return True
