"""Housekeeping: drop certificate rows long expired (after a retention period; the audit
trail keeps every issuance) and used or expired join tokens. Runs on one replica at a time
and is idempotent: running it again after a crash removes what is left."""

from __future__ import annotations

import logging

from ca_server.db.tx import Tx
from ca_server.services.audit import event
from ca_server.services.context import CAContext

log = logging.getLogger(__name__)

PRUNE_LEASE = "prune"
# Certificate rows deleted per transaction: each is one short write on the writer (the
# event loop's, on SQLite), so a backlog of many thousands never stalls issuance.
PRUNE_CHUNK = 2000


async def prune(ctx: CAContext, retention: float) -> tuple[int, int]:
    """(certificate rows, tokens) removed; (0, 0) when another replica holds the lease."""
    if not await ctx.take_lease(PRUNE_LEASE, 600.0):
        return 0, 0
    now = ctx.clock.now()
    cutoff = now - retention

    def prune_chunk(tx: Tx) -> int:
        return tx.prune_certificates(cutoff, limit=PRUNE_CHUNK)

    certificates = 0
    while True:
        removed = await ctx.writer.submit(prune_chunk)
        certificates += removed
        if removed < PRUNE_CHUNK:
            break
    tokens = await ctx.writer.submit(lambda tx: tx.prune_join_tokens(now))
    if certificates or tokens:
        audit = event(
            now,
            "system",
            "prune",
            "database",
            certificates=certificates,
            tokens=tokens,
            expired_before=cutoff,
        )
        await ctx.write(lambda tx: None, [audit])
        log.info("pruned", extra={"certificates": certificates, "tokens": tokens})
    return certificates, tokens
