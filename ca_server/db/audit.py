"""The audit trail: who did what to which object, when. Appended in batches, read newest
first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from ca_server.db.models import AUDIT_EVENTS
from ca_server.db.txbase import TxBase, check_limit
from ca_server.domain import AuditEvent

_AE = AUDIT_EVENTS.c
_INSERT_AUDIT_EVENT = AUDIT_EVENTS.insert()  # built once: issuance inserts at every commit


def _event(row: Any) -> AuditEvent:
    return AuditEvent(
        id=int(row.id),
        at=float(row.at),
        actor=row.actor,
        action=row.action,
        subject=row.subject,
        details=dict(row.details or {}),
    )


class AuditOps(TxBase):
    def add_audit_events(self, events: Sequence[AuditEvent]) -> None:
        """Append events in one multi-row INSERT; their `id` is assigned by the database
        (any id set on the events is ignored)."""
        self._require_write("add_audit_events")
        if not events:
            return
        rows = [
            {
                "at": event.at,
                "actor": event.actor,
                "action": event.action,
                "subject": event.subject,
                "details": event.details,
            }
            for event in events
        ]
        self._exec(_INSERT_AUDIT_EVENT, rows, what="audit event")

    def list_audit_events(
        self, *, limit: int, action: str | None = None, subject: str | None = None
    ) -> list[AuditEvent]:
        """The newest `limit` events, newest first, optionally filtered."""
        check_limit(limit)
        statement = select(AUDIT_EVENTS).order_by(_AE.at.desc(), _AE.id.desc()).limit(limit)
        if action is not None:
            statement = statement.where(_AE.action == action)
        if subject is not None:
            statement = statement.where(_AE.subject == subject)
        return [_event(row) for row in self._exec(statement)]
