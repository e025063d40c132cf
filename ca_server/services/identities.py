"""Workload identities: a node lists the entries registered to it and signs a batch of CSRs
for them in one call. A node gets exactly its own entries; anything else is refused and
nothing of the batch is signed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ca_server.db.entries import ALL_NODES
from ca_server.db.tx import Tx
from ca_server.domain import Entry
from ca_server.errors import InvalidRequest, PermissionDenied
from ca_server.services.audit import event
from ca_server.services.context import CAContext
from ca_server.services.issuing import Issued, csr_public_key, issue
from ca_server.services.nodes import AuthenticatedNode
from meshtls.clock import utc
from meshtls.identity.ids import SpiffeId


@dataclass(frozen=True)
class SignedIdentity:
    entry: Entry
    issued: Issued


def entries_loader(
    ctx: CAContext,
) -> Callable[[Tx, str, int], tuple[list[Entry], list[Entry]]]:
    """Reads a node's own entries and the shared ones into the cache `list_for_node` uses
    (pass it to `nodes.authenticate(also=...)` to read them with the caller's node), given
    the access version the same transaction saw."""

    def load(tx: Tx, node_name: str, read_at: int) -> tuple[list[Entry], list[Entry]]:
        own, shared = tx.entries_for_node(node_name), tx.entries_for_node(ALL_NODES)
        ctx.entries_cache.put(node_name, own, read_at)
        ctx.entries_cache.put(ALL_NODES, shared, read_at)
        return own, shared

    return load


async def list_for_node(ctx: CAContext, caller: AuthenticatedNode) -> list[Entry]:
    """The node's own entries and the entries for every node (`*`), by SPIFFE ID. Each set
    is cached under its own node name, so an entry change clears the one it belongs to."""
    cached_own: list[Entry] | None = ctx.entries_cache.get(caller.name)
    cached_shared: list[Entry] | None = ctx.entries_cache.get(ALL_NODES)
    if cached_own is None or cached_shared is None:
        load = entries_loader(ctx)
        own, shared = await ctx.lookup(lambda tx: load(tx, caller.name, tx.access_version()))
    else:
        own, shared = cached_own, cached_shared
    if not shared:
        return own
    return sorted([*own, *shared], key=lambda e: (e.spiffe_id, e.id))


async def sign_batch(
    ctx: CAContext, caller: AuthenticatedNode, requests: Sequence[tuple[str, bytes]]
) -> list[SignedIdentity]:
    if not requests:
        raise InvalidRequest("no CSR in the request")
    limit = ctx.config.max_csrs_per_batch
    if len(requests) > limit:
        raise InvalidRequest(f"{len(requests)} CSRs in one call; at most {limit} are allowed")
    entry_ids = [entry_id for entry_id, _ in requests]
    if len(set(entry_ids)) != len(entry_ids):
        raise InvalidRequest("the same entry appears more than once in the batch")
    # Parse and verify every CSR before signing anything.
    keys = []
    for entry_id, csr_der in requests:
        try:
            keys.append(csr_public_key(csr_der))
        except InvalidRequest as exc:
            raise InvalidRequest(f"entry {entry_id}: {exc.message}") from None
    if len(requests) > 1:
        ctx.limiter.check(f"node:{caller.name}", cost=len(requests) / 10)
    entries = {e.id: e for e in await list_for_node(ctx, caller)}
    ctx.admit_signatures(len(requests))
    missing = [entry_id for entry_id in entry_ids if entry_id not in entries]
    if missing:
        raise PermissionDenied(
            f"entry {missing[0]} is not registered to node {caller.name} (or does not exist); "
            "nothing was signed"
        )
    now = ctx.clock.now()
    signer = ctx.trust.keyring.signer
    signed = []
    for (entry_id, _), public_key in zip(requests, keys, strict=True):
        entry = entries[entry_id]
        signed.append(
            SignedIdentity(
                entry,
                issue(
                    signer,
                    public_key,
                    spiffe_id=SpiffeId.parse(entry.spiffe_id),
                    ttl_seconds=entry.ttl_seconds,
                    now=now,
                    kind="workload",
                    node_name=caller.name,
                    entry_id=entry.id,
                    dns_names=entry.dns_names,
                ),
            )
        )
    records = [s.issued.record for s in signed]
    actor = str(caller.spiffe_id)
    events = [
        event(
            now,
            actor,
            "certificate.issue",
            r.serial,
            kind="workload",
            spiffe_id=r.spiffe_id,
            node=caller.name,
            entry=r.entry_id,
            not_after=utc(r.not_after).isoformat(),
        )
        for r in records
    ]
    await ctx.record_issuance(caller.name, records, events)
    ctx.metrics.issued.labels("workload").inc(len(records))
    return signed
