"""Operator actions: registration entries, certificates, revocation, nodes and bans."""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Sequence

from ca_server.db.entries import ALL_NODES
from ca_server.db.notify import notify_trust_changed
from ca_server.db.tx import Tx
from ca_server.domain import AuditEvent, CertificateRecord, Entry, Node
from ca_server.errors import InvalidRequest, NotFound
from ca_server.services.audit import event, log_committed
from ca_server.services.context import CAContext
from meshtls.identity.ids import InvalidSpiffeId, SpiffeId, validate_node_name
from meshtls.identity.x509 import CertificateError, normalize_serial

MAX_PAGE = 1000
DEFAULT_PAGE = 100
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SELECTOR = re.compile(r"^[a-z0-9_-]+:[A-Za-z0-9_.:*/-]+$")
# The Unix selectors the sidecar attests (sidecar/workload_api/attestation.py).
_UNIX_SELECTOR = re.compile(
    r"^unix:(uid:[0-9]{1,10}|gid:[0-9]{1,10}|user:[A-Za-z0-9_.-]+|group:[A-Za-z0-9_.-]+)$"
)


def page_size(requested: int) -> int:
    if requested <= 0:
        return DEFAULT_PAGE
    return min(requested, MAX_PAGE)


def _check_dns_name(name: str) -> str:
    lowered = name.lower().rstrip(".")
    labels = lowered.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if not labels or len(lowered) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise InvalidRequest(f"{name!r} is not a valid DNS name")
    try:
        ipaddress.ip_address(lowered)
    except ValueError:
        return lowered
    raise InvalidRequest(f"{name!r} is an IP address, not a DNS name")


async def create_entry(
    ctx: CAContext,
    *,
    spiffe_id: str,
    node_name: str,
    dns_names: Sequence[str],
    ttl_seconds: int,
    selectors: Sequence[str],
    actor: str,
) -> Entry:
    try:
        parsed = SpiffeId.parse(spiffe_id)
        if node_name != ALL_NODES:
            validate_node_name(node_name)
    except InvalidSpiffeId as exc:
        raise InvalidRequest(str(exc)) from None
    if parsed.trust_domain != ctx.config.trust_domain:
        raise InvalidRequest(f"{spiffe_id} is not in trust domain {ctx.config.trust_domain}")
    if parsed.path.startswith("meshtls/"):
        raise InvalidRequest("SPIFFE IDs under /meshtls/ are reserved for nodes and the CA")
    ttl = ttl_seconds or int(ctx.config.default_leaf_ttl)
    if not 60 <= ttl <= ctx.config.max_leaf_ttl:
        raise InvalidRequest(
            f"TTL {ttl}s is out of range: between 60s and {ctx.config.max_leaf_ttl:.0f}s"
        )
    for selector in selectors:
        if not _SELECTOR.match(selector):
            raise InvalidRequest(
                f"selector {selector!r} must look like type:value, e.g. unix:uid:1000"
            )
        if selector.startswith("unix:") and not _UNIX_SELECTOR.match(selector):
            raise InvalidRequest(
                f"selector {selector!r}: the unix selectors are unix:uid:<number>, "
                "unix:gid:<number>, unix:user:<name> and unix:group:<name>"
            )
    entry = Entry(
        id=uuid.uuid4().hex,
        spiffe_id=str(parsed),
        node_name=node_name,
        dns_names=tuple(dict.fromkeys(_check_dns_name(n) for n in dns_names)),
        ttl_seconds=ttl,
        selectors=tuple(dict.fromkeys(selectors)),
        created_at=ctx.clock.now(),
    )
    audit = event(
        entry.created_at,
        actor,
        "entry.create",
        entry.id,
        spiffe_id=entry.spiffe_id,
        node=node_name,
        dns_names=list(entry.dns_names),
        ttl_seconds=ttl,
        selectors=list(entry.selectors),
    )
    await ctx.write(lambda tx: tx.add_entry(entry), [audit])
    ctx.entries_cache.discard(node_name)
    return entry


async def delete_entry(ctx: CAContext, entry_id: str, actor: str) -> Entry:
    if not entry_id:
        raise InvalidRequest("an entry id is required")
    audit = event(ctx.clock.now(), actor, "entry.delete", entry_id)
    deleted = await ctx.write(lambda tx: tx.delete_entry(entry_id), [audit])
    ctx.entries_cache.discard(deleted.node_name)
    return deleted


def _serial(text: str) -> str:
    try:
        return normalize_serial(text)
    except CertificateError as exc:
        raise InvalidRequest(str(exc)) from None


async def get_certificate(ctx: CAContext, serial: str) -> CertificateRecord:
    normalized = _serial(serial)
    record = await ctx.read(lambda tx: tx.get_certificate(normalized))
    if record is None:
        raise NotFound(f"no certificate with serial {normalized}")
    return record


async def revoke_certificate(
    ctx: CAContext, serial: str, reason: str, actor: str
) -> CertificateRecord:
    normalized = _serial(serial)
    reason = (reason or "unspecified")[:200]
    now = ctx.clock.now()

    audit = event(now, actor, "certificate.revoke", normalized, reason=reason)

    def revoke(tx: Tx) -> CertificateRecord:
        # The store bumps the trust-bundle version in the same transaction when it revokes;
        # the other replicas hear of it when that transaction commits.
        revoked = tx.revoke_certificate(normalized, now, reason)
        notify_trust_changed(tx)
        return revoked

    record = await ctx.write(revoke, [audit])
    ctx.auth_cache.discard(normalized)
    await ctx.refresh_trust()
    return record


async def ban_node(ctx: CAContext, name: str, reason: str, actor: str) -> Node:
    if not name:
        raise InvalidRequest("a node name is required")
    now = ctx.clock.now()
    reason = (reason or "banned by operator")[:200]

    revocations: list[AuditEvent] = []

    def work(tx: Tx) -> Node:
        node = tx.ban_node(name, now)
        serials = tx.revoke_node_certificates(name, now, f"node banned: {reason}")
        revocations[:] = [
            event(now, actor, "certificate.revoke", s, reason="node banned") for s in serials
        ]
        tx.add_audit_events(revocations)
        notify_trust_changed(tx)
        return node

    node = await ctx.write(work, [event(now, actor, "node.ban", name, reason=reason)])
    log_committed(revocations)
    ctx.auth_cache.clear()
    ctx.entries_cache.discard(name)
    await ctx.refresh_trust()
    return node
