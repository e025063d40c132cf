"""A batch of issuances recorded on PostgreSQL in one statement.

The group commit's everyday transaction is a batch of issuances: check that none of the
calling nodes is banned, insert their certificates, insert the certificates' audit
events. As a transaction that is six round trips on PostgreSQL (the pool's pre-ping,
BEGIN, the check, the two inserts, COMMIT), and under load each reply also waits for the
event loop to finish the call it is signing. `RECORD_ISSUANCES` does all three in one
statement (a CTE over the rows of each table, sent as one JSON array by
`record_issuances_params`), which PostgreSQL runs atomically in its own implicit
transaction when the connection is in autocommit mode (`Store.record_issuances`): one
round trip after the pre-ping, and nothing of it is written if any part fails. Rows of a
banned node are left out, and the statement returns the banned nodes' names.

SQLite keeps the three statements in its write transaction (`Tx.banned_nodes`,
`add_certificates`, `add_audit_events`): in-process, no round trips to save.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, Column, Double, TextClause, text

from ca_server.db.models import AUDIT_EVENTS, CERTIFICATES
from ca_server.domain import AuditEvent, CertificateRecord

# What one issuing request writes: its node's name, its certificates, their audit events.
Issuance = tuple[str, Sequence[CertificateRecord], Sequence[AuditEvent]]

# The certificate columns an issuance sets (a new certificate is not revoked).
_CERTIFICATE_COLUMNS = [
    column
    for column in CERTIFICATES.columns
    if column.name not in ("revoked_at", "revocation_reason")
]
_EVENT_COLUMNS = [column for column in AUDIT_EVENTS.columns if column.name != "id"]


def _sql_type(column: Column[Any]) -> str:
    if isinstance(column.type, JSON):
        return "json"
    return "float8" if isinstance(column.type, Double) else "text"


def _recordset(parameter: str, columns: list[Column[Any]]) -> str:
    """The rows of a JSON array parameter (one object per row: its columns and `node`)."""
    fields = ", ".join([*(f"{c.name} {_sql_type(c)}" for c in columns), "node text"])
    return f"json_to_recordset(CAST(:{parameter} AS json)) AS r({fields})"


def _build() -> TextClause:
    certificate_columns = ", ".join(c.name for c in _CERTIFICATE_COLUMNS)
    event_columns = ", ".join(c.name for c in _EVENT_COLUMNS)
    # Built from the schema's own column names, once; every value is a bound parameter.
    return text(
        f"""
        WITH banned AS (
            SELECT name FROM nodes
            WHERE name = ANY(CAST(:nodes AS text[])) AND status = 'banned'
        ), added_certificates AS (
            INSERT INTO certificates ({certificate_columns})
            SELECT {certificate_columns} FROM {_recordset("certificates", _CERTIFICATE_COLUMNS)}
            WHERE node NOT IN (SELECT name FROM banned)
        ), added_events AS (
            INSERT INTO audit_events ({event_columns})
            SELECT {event_columns} FROM {_recordset("events", _EVENT_COLUMNS)}
            WHERE node NOT IN (SELECT name FROM banned)
        )
        SELECT name FROM banned
        """  # noqa: S608
    )


RECORD_ISSUANCES = _build()  # built once: the issuance hot path on PostgreSQL


def record_issuances_params(issuances: Sequence[Issuance]) -> dict[str, Any]:
    """The parameters of `RECORD_ISSUANCES` for `issuances`: the nodes, and the rows of
    each table as one JSON array (encoded in C, where one array per column cost a Python
    call per value)."""
    certificates = []
    events = []
    for node, records, audit_events in issuances:
        for record in records:
            row = {c.name: getattr(record, c.name) for c in _CERTIFICATE_COLUMNS}
            row["node"] = node
            certificates.append(row)
        for event in audit_events:
            row = {c.name: getattr(event, c.name) for c in _EVENT_COLUMNS}
            row["node"] = node
            events.append(row)
    return {
        "nodes": sorted({node for node, _, _ in issuances if node}),
        "certificates": json.dumps(certificates),
        "events": json.dumps(events),
    }
