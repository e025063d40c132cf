"""`meshtls-ca authority import`: a new operator intermediate for a running upstream-mode CA.

The import is validated (`authority.upstream_import.prepare_import`), stored with its key
encrypted under the KEK in one transaction with its audit event (a new root of the
operator enters the trust bundle in that same commit, and every replica hears of it), and
then handed to the rotation check, which activates it when the activation rule allows:
at once when it chains to a root peers already trust, is valid now and outlives the active
intermediate; otherwise at the time `ImportResult.activates_at` names. It runs under the
cluster-wide rotation lease, like a rotation.
"""

from __future__ import annotations

import logging

from ca_server.authority.upstream_import import next_import_activation, prepare_import
from ca_server.db.notify import notify_trust_changed
from ca_server.db.tx import Tx
from ca_server.services.audit import event
from ca_server.services.authorities import AuthorityManager, ImportResult
from ca_server.services.context import CAContext
from meshtls.clock import utc

log = logging.getLogger(__name__)

# The leaf TTL rule: an issuer must live at least this many times the longest leaf TTL.
LIFETIME_FACTOR = 6


async def import_intermediate(
    ctx: CAContext,
    manager: AuthorityManager,
    *,
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes,
    actor: str,
) -> ImportResult:
    await manager.require_lease()
    authorities = await ctx.read(lambda tx: tx.list_authorities())
    now = ctx.clock.now()
    config = ctx.config
    longest_leaf = max(config.max_leaf_ttl, config.default_leaf_ttl, config.node_ttl)
    plan = prepare_import(
        cert_pem,
        key_pem,
        chain_pem,
        authorities=authorities,
        kek=manager.kek,
        now=now,
        trust_domain=config.trust_domain,
        min_lifetime=LIFETIME_FACTOR * longest_leaf,
    )
    events = [
        event(
            now,
            actor,
            "authority.import",
            a.id,
            kind=a.kind,
            state=a.state,
            certificate_subject=a.subject,
            fingerprint=a.fingerprint_sha256,
            not_before=utc(a.not_before).isoformat(),
            not_after=utc(a.not_after).isoformat(),
            upstream=True,
        )
        for a in plan.records
    ]

    def add(tx: Tx) -> None:
        for record in plan.records:
            tx.add_authority(record)
        notify_trust_changed(tx)

    await ctx.write(add, events)
    await manager.reload()
    await manager.tick()
    authorities = await ctx.read(lambda tx: tx.list_authorities())
    imported = next(a for a in authorities if a.id == plan.intermediate.id)
    due = None
    if imported.state == "prepared":
        due = next_import_activation(authorities, manager.settings.min_propagation)
        if due is not None:
            await manager.schedule_activation(due)
    log.warning(
        "operator intermediate imported",
        extra={
            "authority_id": imported.id,
            "state": imported.state,
            "new_root": plan.new_root.id if plan.new_root else None,
            "activates_at": utc(due).isoformat() if due is not None else None,
        },
    )
    return ImportResult(imported, plan.new_root, authorities, due)
