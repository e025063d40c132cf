"""The sidecar's status endpoints, served by `meshtls.statushttp` on loopback:

* `/healthz`  200 while the process runs;
* `/readyz`   200 once the node identity and every registered identity are held and
              unexpired, else 503 with the reason;
* `/metrics`  Prometheus text format from the sidecar's own registry;
* `/status`   JSON: node, identities (serial, expiry, last renewal), CA reachability,
              the last error, the problem needing an operator, the trust bundle version.
"""

from __future__ import annotations

from typing import Any

from meshtls.clock import Clock, utc
from meshtls.statushttp import Handler, Request, Response, metrics_handler
from sidecar.identity.manager import IdentityManager
from sidecar.metrics import SidecarMetrics


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc(ts).isoformat(timespec="seconds")


def status_document(manager: IdentityManager, clock: Clock) -> dict[str, Any]:
    """The /status JSON document (also what `meshtls-sidecar status` prints)."""
    now = clock.now()
    snap = manager.snapshot()
    ready, reason = manager.readiness()
    config = manager.config
    node: dict[str, Any] = {"name": config.node, "spiffe_id": str(config.node_id)}
    if snap.node is not None:
        svid = snap.node.svid
        node.update(
            serial=svid.serial,
            not_after=_iso(svid.not_after),
            expires_in_seconds=round(svid.not_after - now, 1),
            last_renewal=_iso(snap.node.issued_at),
            renew_at=_iso(snap.node.renew_at),
        )
    identities = []
    for ident in sorted(snap.identities.values(), key=lambda w: str(w.entry.spiffe_id)):
        identities.append(
            {
                "entry_id": ident.entry.id,
                "spiffe_id": str(ident.entry.spiffe_id),
                "serial": ident.svid.serial,
                "not_after": _iso(ident.svid.not_after),
                "expires_in_seconds": round(ident.svid.not_after - now, 1),
                "last_renewal": _iso(ident.issued_at),
                "renew_at": _iso(ident.renew_at),
                "revoked": ident.svid.serial in snap.revoked,
            }
        )
    held = set(snap.identities)
    entries = manager.entries()
    pending = sorted(str(e.spiffe_id) for e in entries or () if e.id not in held)
    health = manager.health
    last_error = health.last_error
    return {
        "ready": ready,
        "reason": reason,
        "problem": manager.problem(),
        "now": _iso(now),
        "node": node,
        "identities": identities,
        "pending_identities": pending,
        "entries_listed": entries is not None,
        "ca": {
            "address": str(config.ca.address),
            "enroll_address": str(config.ca.enroll_address),
            "reachable": health.ca_reachable,
            "last_contact": _iso(health.last_contact),
            "next_retry": _iso(manager.retry_at) if manager.retry_at > now else None,
        },
        "last_error": None
        if last_error is None
        else {
            "operation": last_error.operation,
            "reason": last_error.reason,
            "message": last_error.message,
            "at": _iso(last_error.at),
        },
        "failures": health.failures_by_reason(),
        "renewals": dict(health.renewals),
        "bundle": None
        if snap.bundle is None
        else {
            "trust_domain": snap.bundle.trust_domain,
            "version": snap.bundle.version,
            "roots_sha256": list(snap.bundle.fingerprints()),
        },
        "state_problems": list(manager.state_problems),
        "state_write_failures": manager.persist_failures,
    }


def routes(manager: IdentityManager, clock: Clock, metrics: SidecarMetrics) -> dict[str, Handler]:
    async def healthz(_: Request) -> Response:
        return Response.text("ok")

    async def readyz(_: Request) -> Response:
        ready, reason = manager.readiness()
        return Response.text(reason, 200 if ready else 503)

    async def status(_: Request) -> Response:
        return Response.json(status_document(manager, clock))

    return {
        "/healthz": healthz,
        "/readyz": readyz,
        "/metrics": metrics_handler(metrics.registry),
        "/status": status,
    }
