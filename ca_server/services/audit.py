"""Audit trail: every issuance, token creation and use, entry change, revocation and ban is
a row in `audit_events` (written in the same transaction as the change) and, once committed,
one structured log line. Events never carry secrets: tokens appear only as a hash prefix."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ca_server.domain import AuditEvent

log = logging.getLogger("meshtls.audit")


def event(at: float, actor: str, action: str, subject: str, **details: Any) -> AuditEvent:
    return AuditEvent(at=at, actor=actor, action=action, subject=subject, details=details)


def log_committed(events: Iterable[AuditEvent]) -> None:
    if not log.isEnabledFor(logging.INFO):
        return  # the rows are the record; skip building a log record per event
    for e in events:
        log.info(
            "audit %s %s",
            e.action,
            e.subject,
            extra={"audit_action": e.action, "actor": e.actor, "subject": e.subject, **e.details},
        )
