"""Nodes: join tokens, enrollment, node-certificate renewal, and authenticating a node from
the certificate it presented over mutual TLS.

Enrollment proves which node the caller is, by a join token (checked here, against the
database) or by an attestor (`ca_server.attestation`, e.g. a Kubernetes service-account
token), then issues the node certificate. A new enrollment of a node supersedes its
previous certificate at once (a DaemonSet pod replaced on upgrade enrolls again); each is
audited as `node.enroll` with the method used.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509

from ca_server.attestation import Attestation, NodeAttestor
from ca_server.db.tx import Tx
from ca_server.domain import AuditEvent, CertificateRecord, JoinToken, Node
from ca_server.errors import FailedPrecondition, InvalidRequest, PermissionDenied, Unauthenticated
from ca_server.services.audit import event, log_committed
from ca_server.services.context import CAContext
from ca_server.services.issuing import Issued, csr_public_key, issue
from meshtls.clock import utc
from meshtls.identity.ids import InvalidSpiffeId, SpiffeId, validate_node_name
from meshtls.identity.x509 import CertificateError, SubjectPublicKey, serial_hex, spiffe_id_of

TOKEN_BYTES = 32  # 256 bits of randomness
TOKEN_PREFIX = "mjt_"  # noqa: S105 - a public prefix, not a secret
# Projected service-account tokens are JWTs of about 1 KiB; anything far longer is refused
# before the API server is asked.
MAX_SERVICE_ACCOUNT_TOKEN_BYTES = 16 * 1024


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_label(token_hash: str) -> str:
    """What logs and audit rows may show of a token: a short prefix of its hash."""
    return f"sha256:{token_hash[:12]}"


@dataclass(frozen=True)
class AuthenticatedNode:
    name: str
    spiffe_id: SpiffeId
    serial: str
    node: Node


@dataclass(frozen=True)
class Enrolled:
    node_name: str
    spiffe_id: SpiffeId
    issued: Issued


async def create_join_token(
    ctx: CAContext, node_name: str, ttl_seconds: float | None, actor: str
) -> tuple[str, JoinToken]:
    try:
        validate_node_name(node_name)
    except InvalidSpiffeId as exc:
        raise InvalidRequest(str(exc)) from None
    ttl = ttl_seconds or ctx.config.join_token_ttl
    if ttl > ctx.config.max_join_token_ttl:
        raise InvalidRequest(
            f"token TTL {ttl:.0f}s exceeds the maximum of {ctx.config.max_join_token_ttl:.0f}s"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    now = ctx.clock.now()
    record = JoinToken(hash_token(token), node_name, now, now + ttl)
    audit = event(
        now,
        actor,
        "token.create",
        node_name,
        token=token_label(record.token_hash),
        expires_at=utc(record.expires_at).isoformat(),
    )
    await ctx.write(lambda tx: tx.add_join_token(record), [audit])
    return token, record


def check_token_usable(token: JoinToken | None, now: float) -> JoinToken:
    if token is None:
        raise Unauthenticated("join token is not known")
    if token.used_at is not None:
        raise Unauthenticated(f"join token was already used at {utc(token.used_at).isoformat()}")
    if token.expires_at <= now:
        raise Unauthenticated(f"join token expired at {utc(token.expires_at).isoformat()}")
    return token


async def enroll(ctx: CAContext, token: str, csr_der: bytes, peer: str) -> Enrolled:
    """Consume the join token and issue the node certificate, atomically.

    The token is consumed in the same transaction that records the certificate; if two
    enrollments race on one token, the conditional update lets exactly one commit.
    """
    if not token:
        raise Unauthenticated("a join token is required to enroll")
    if len(token) > 256:
        raise Unauthenticated("join token is not known")
    public_key = csr_public_key(csr_der)
    token_hash = hash_token(token)
    ctx.limiter.check(f"enroll:{peer.rsplit(':', 1)[0]}")
    now = ctx.clock.now()
    # A cheap read first, so an unusable token costs no signature; the commit consumes it
    # atomically.
    pending = await ctx.read(lambda tx: tx.get_join_token(token_hash))
    node_name = check_token_usable(pending, now).node_name
    actor = f"token:{token_label(token_hash)}"
    return await enroll_attested(
        ctx,
        Attestation(node_name, "join_token", actor),
        public_key,
        peer,
        consume=lambda tx: tx.consume_join_token(token_hash, now),
        events=[event(now, actor, "token.use", node_name, peer=peer)],
    )


async def enroll_kubernetes(
    ctx: CAContext,
    attestor: NodeAttestor | None,
    token: str,
    node_name: str,
    csr_der: bytes,
    peer: str,
) -> Enrolled:
    """Enroll with a Kubernetes projected service-account token (ca_server.attestation.k8s).
    Everything cheap is checked before the API server is asked."""
    if attestor is None:
        raise FailedPrecondition(
            "Kubernetes enrollment is not enabled on this CA: add a `kubernetes` section to "
            "its configuration, or enroll with a join token"
        )
    if not token:
        raise Unauthenticated("a service-account token is required to enroll on Kubernetes")
    if len(token) > MAX_SERVICE_ACCOUNT_TOKEN_BYTES:
        raise Unauthenticated("the service-account token is too long to be one")
    if not node_name:
        raise InvalidRequest("node_name is required: the node this sidecar runs on")
    try:
        validate_node_name(node_name)
    except InvalidSpiffeId as exc:
        raise InvalidRequest(f"node_name: {exc}") from None
    public_key = csr_public_key(csr_der)
    ctx.limiter.check(f"enroll:{peer.rsplit(':', 1)[0]}")
    attestation = await attestor.attest(token, node_name)
    return await enroll_attested(ctx, attestation, public_key, peer)


async def enroll_attested(
    ctx: CAContext,
    attestation: Attestation,
    public_key: SubjectPublicKey,
    peer: str,
    *,
    consume: Callable[[Tx], object] | None = None,
    events: Sequence[AuditEvent] = (),
) -> Enrolled:
    """Issue the node certificate for a node whose identity was proven. It replaces the
    node's current (and any pending renewed) certificate in the same transaction; a banned
    node stays banned. `consume` runs first in that transaction (a join token's use);
    `events` are audited with it."""
    node_name = attestation.node_name
    now = ctx.clock.now()
    existing = await ctx.read(lambda tx: tx.get_node(node_name))
    if existing is not None and existing.status == "banned":
        raise PermissionDenied(f"node {node_name} is banned")
    spiffe_id = SpiffeId.for_node(ctx.config.trust_domain, node_name)
    ctx.admit_signatures(1)
    issued = issue(
        ctx.trust.keyring.signer,
        public_key,
        spiffe_id=spiffe_id,
        ttl_seconds=ctx.config.node_ttl,
        now=now,
        kind="node",
        node_name=node_name,
    )
    record = issued.record
    superseded: list[str] = []
    enrolled: list[AuditEvent] = []

    def commit(tx: Tx) -> None:
        if consume is not None:
            consume(tx)
        node = tx.get_node(node_name)
        if node is not None and node.status == "banned":
            raise PermissionDenied(f"node {node_name} is banned")
        tx.upsert_node(
            Node(
                name=node_name,
                spiffe_id=str(spiffe_id),
                status="active",
                current_serial=record.serial,
                enrolled_at=now,
                last_seen_at=now,
                certificate_expires_at=record.not_after,
            )
        )
        tx.add_certificates([record])
        previous = [node.current_serial, node.pending_serial] if node is not None else []
        superseded[:] = [s for s in previous if s]
        # Written here, where the certificate it replaces is known for sure.
        enrolled[:] = [
            event(
                now,
                attestation.actor,
                "node.enroll",
                node_name,
                method=attestation.method,
                serial=record.serial,
                previous_serial=node.current_serial if node is not None else None,
                peer=peer,
                **attestation.details,
            )
        ]
        tx.add_audit_events(enrolled)

    issue_event = event(
        now,
        str(spiffe_id),
        "certificate.issue",
        record.serial,
        kind="node",
        spiffe_id=str(spiffe_id),
        node=node_name,
        not_after=utc(record.not_after).isoformat(),
    )
    await ctx.write(commit, [*events, issue_event])
    log_committed(enrolled)
    for serial in superseded:
        ctx.auth_cache.discard(serial)
    ctx.metrics.issued.labels("node").inc()
    return Enrolled(node_name, spiffe_id, issued)


def parse_peer_certificate(pem: bytes | None, trust_domain: str) -> tuple[str, SpiffeId, str]:
    """(node name, SPIFFE ID, serial) of a verified peer certificate, or Unauthenticated."""
    if not pem:
        raise Unauthenticated(
            "this call needs the node certificate: connect to the agent listener with mutual TLS"
        )
    try:
        spiffe_id, serial = _certificate_identity(pem)
    except (ValueError, CertificateError) as exc:
        raise Unauthenticated(f"the client certificate is not a meshtls identity: {exc}") from None
    name = spiffe_id.node_name
    if spiffe_id.trust_domain != trust_domain or name is None:
        raise Unauthenticated(
            f"the client certificate identifies {spiffe_id}, not a node of {trust_domain}"
        )
    return name, spiffe_id, serial


@functools.lru_cache(maxsize=4096)
def _certificate_identity(pem: bytes) -> tuple[SpiffeId, str]:
    """(SPIFFE ID, serial) of a PEM certificate. Cached: every call of a node's connection
    presents the same certificate, and parsing it cost more than the rest of
    authenticating a cached caller. Only certificates TLS verified reach it."""
    cert = x509.load_pem_x509_certificate(pem)
    return spiffe_id_of(cert), serial_hex(cert)


async def authenticate(
    ctx: CAContext,
    peer_pem: bytes | None,
    *,
    also: Callable[[Tx, str, int], object] | None = None,
) -> AuthenticatedNode:
    """The node behind a verified client certificate, if it may still act.

    TLS already checked the chain and validity; here the CA checks that it issued this very
    certificate as the node's current one (or the renewed one, which then becomes current),
    that it is not revoked, and that the node is not banned. Answers are cached until the
    access version moves (`services.cache`); local bans and revocations clear them at once.

    `also(tx, node name, access version)` runs in the same read when the database is
    asked: a call that needs more of the node's rows next (its entries) reads them in one
    transaction.
    """
    name, spiffe_id, serial = parse_peer_certificate(peer_pem, ctx.config.trust_domain)
    ctx.limiter.check(f"node:{name}")
    cached: AuthenticatedNode | None = ctx.auth_cache.get(serial)
    if cached is not None:
        return cached

    def load(tx: Tx) -> tuple[Node | None, CertificateRecord | None, int]:
        version = tx.access_version()
        node, record = tx.get_node(name), tx.get_certificate(serial)
        if also is not None and node is not None:
            also(tx, name, version)
        return node, record, version

    node, record, read_at = await ctx.lookup(load)
    if node is None or record is None or record.kind != "node" or record.node_name != name:
        raise Unauthenticated(f"the client certificate (serial {serial}) was not issued to {name}")
    if node.status == "banned":
        raise PermissionDenied(f"node {name} is banned")
    if record.revoked_at is not None:
        raise Unauthenticated(f"the client certificate (serial {serial}) has been revoked")
    if serial == node.pending_serial:
        await _promote(ctx, node, record)
    elif serial != node.current_serial:
        raise Unauthenticated(
            f"the client certificate (serial {serial}) was superseded by a later renewal of "
            f"node {name}; use the current node certificate"
        )
    caller = AuthenticatedNode(name, spiffe_id, serial, node)
    ctx.auth_cache.put(serial, caller, read_at)
    return caller


async def _promote(ctx: CAContext, node: Node, record: CertificateRecord) -> None:
    """First use of a renewed node certificate: it becomes the only one accepted."""
    now = ctx.clock.now()
    audit = event(
        now,
        node.spiffe_id,
        "node.certificate.activate",
        node.name,
        serial=record.serial,
        previous_serial=node.current_serial,
    )

    def promote(tx: Tx) -> bool:
        if tx.promote_node_certificate(node.name, record.serial, record.not_after, now):
            return True
        # Another connection of the same node may have promoted it a moment ago.
        current = tx.get_node(node.name)
        return current is not None and current.current_serial == record.serial

    promoted = await ctx.write(promote, [audit])
    if not promoted:
        raise Unauthenticated(
            f"the client certificate (serial {record.serial}) was superseded by a later "
            f"renewal of node {node.name}"
        )
    if node.current_serial:
        ctx.auth_cache.discard(node.current_serial)


async def renew(ctx: CAContext, caller: AuthenticatedNode, csr_der: bytes) -> Issued:
    public_key = csr_public_key(csr_der)
    ctx.admit_signatures(1)
    now = ctx.clock.now()
    issued = issue(
        ctx.trust.keyring.signer,
        public_key,
        spiffe_id=caller.spiffe_id,
        ttl_seconds=ctx.config.node_ttl,
        now=now,
        kind="node",
        node_name=caller.name,
    )
    record = issued.record

    def commit(tx: Tx) -> None:
        node = tx.get_node(caller.name)
        if node is None or node.status == "banned":
            raise PermissionDenied(f"node {caller.name} is banned")
        tx.add_certificates([record])
        # The new certificate becomes current on first use; until then the old one works.
        tx.set_node_pending_certificate(caller.name, record.serial, now)

    audit = event(
        now,
        str(caller.spiffe_id),
        "certificate.issue",
        record.serial,
        kind="node",
        spiffe_id=str(caller.spiffe_id),
        node=caller.name,
        renewed_serial=caller.serial,
        not_after=utc(record.not_after).isoformat(),
    )
    await ctx.write(commit, [audit])
    ctx.metrics.issued.labels("node").inc()
    return issued
