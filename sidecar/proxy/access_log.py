"""The proxy's log lines: one access-log line per connection (logger
`sidecar.proxy.access`), and one line per refusal, in plain words, with its reason label
(logger `sidecar.proxy`). Fields go in `extra=` so that `--log-format json` keeps them
apart; no certificate or key material is ever logged, only SPIFFE IDs and serials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sidecar.proxy.peer import Refusal

access_log = logging.getLogger("sidecar.proxy.access")
log = logging.getLogger("sidecar.proxy")


def format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    if isinstance(address, str) and address:
        return f"unix:{address}"
    return "-"


@dataclass(frozen=True)
class AccessRecord:
    listener: str
    direction: str  # inbound | outbound
    client: str
    peer_id: str  # the verified SPIFFE ID of the TLS peer, "-" if none
    bytes_upstream: int  # from the connecting side onward
    bytes_downstream: int  # back to the connecting side
    duration_ms: float
    result: str  # ok, refused, reset, idle_timeout, max_lifetime, drain_timeout, error
    reason: str  # the refusal reason or error detail, "" when none


def log_access(record: AccessRecord) -> None:
    access_log.info(
        "%s %s %s peer=%s up=%d down=%d %.1fms %s%s",
        record.direction,
        record.listener,
        record.client,
        record.peer_id,
        record.bytes_upstream,
        record.bytes_downstream,
        record.duration_ms,
        record.result,
        f" ({record.reason})" if record.reason else "",
        extra={
            "listener": record.listener,
            "direction": record.direction,
            "client": record.client,
            "peer_id": record.peer_id,
            "bytes_upstream": record.bytes_upstream,
            "bytes_downstream": record.bytes_downstream,
            "duration_ms": round(record.duration_ms, 1),
            "result": record.result,
            "reason": record.reason,
        },
    )


def log_refusal(listener: str, direction: str, client: str, refusal: Refusal) -> None:
    log.warning(
        "%s listener %s refused %s: %s",
        direction,
        listener,
        client,
        refusal.message,
        extra={
            "listener": listener,
            "direction": direction,
            "client": client,
            "reason": refusal.reason,
            "peer_id": refusal.peer_id or "-",
        },
    )


def log_audit_denied(listener: str, client: str, refusal: Refusal) -> None:
    log.warning(
        "inbound listener %s lets %s through in audit mode although %s",
        listener,
        client,
        refusal.message,
        extra={
            "listener": listener,
            "direction": "inbound",
            "client": client,
            "reason": refusal.reason,
            "peer_id": refusal.peer_id or "-",
            "audit": True,
        },
    )
