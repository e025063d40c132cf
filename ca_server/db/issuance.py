"""A batch of issuances recorded on PostgreSQL in one statement.

The group commit's everyday transaction is a batch of issuances: check that none of the
calling nodes is banned, insert their certificates, insert the certificates' audit
events. As a transaction that is six round trips on PostgreSQL (the pool's pre-ping,
BEGIN, the check, the two inserts, COMMIT), and under load each reply also waits for the
event loop to finish the call it is signing. `RECORD_ISSUANCES` does all three in one
statement (a CTE over `unnest` arrays, one array per column, from
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

from sqlalchemy import Column, Double, TextClause, text

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


def _array_type(column: Column[Any]) -> str:
    return "float8[]" if isinstance(column.type, Double) else "text[]"


def _unnest(prefix: str, columns: list[Column[Any]]) -> tuple[str, str]:
    """`unnest(...)` of one array parameter per column plus the rows' node, and its
    column list."""
    arrays = [f"CAST(:{prefix}_{c.name} AS {_array_type(c)})" for c in columns]
    arrays.append(f"CAST(:{prefix}_node AS text[])")
    names = ", ".join([*(f"{prefix}_{c.name}" for c in columns), f"{prefix}_node"])
    return f"unnest({', '.join(arrays)})", names


def _build() -> TextClause:
    cert_unnest, cert_names = _unnest("c", _CERTIFICATE_COLUMNS)
    event_unnest, event_names = _unnest("e", _EVENT_COLUMNS)
    event_values = ", ".join(
        f"CAST(e_{c.name} AS json)" if c.name == "details" else f"e_{c.name}"
        for c in _EVENT_COLUMNS
    )
    # Built from the schema's own column names, once; every value is a bound parameter.
    return text(
        f"""
        WITH banned AS (
            SELECT name FROM nodes
            WHERE name = ANY(CAST(:nodes AS text[])) AND status = 'banned'
        ), added_certificates AS (
            INSERT INTO certificates ({", ".join(c.name for c in _CERTIFICATE_COLUMNS)})
            SELECT {", ".join(f"c_{c.name}" for c in _CERTIFICATE_COLUMNS)}
            FROM {cert_unnest} AS row({cert_names})
            WHERE c_node NOT IN (SELECT name FROM banned)
        ), added_events AS (
            INSERT INTO audit_events ({", ".join(c.name for c in _EVENT_COLUMNS)})
            SELECT {event_values}
            FROM {event_unnest} AS row({event_names})
            WHERE e_node NOT IN (SELECT name FROM banned)
        )
        SELECT name FROM banned
        """  # noqa: S608
    )


RECORD_ISSUANCES = _build()  # built once: the issuance hot path on PostgreSQL


def record_issuances_params(issuances: Sequence[Issuance]) -> dict[str, list[Any]]:
    """The parameters of `RECORD_ISSUANCES` for `issuances`: one array per column."""
    params: dict[str, list[Any]] = {
        "nodes": sorted({node for node, _, _ in issuances if node}),
        "c_node": [],
        "e_node": [],
    }
    for column in _CERTIFICATE_COLUMNS:
        params[f"c_{column.name}"] = []
    for column in _EVENT_COLUMNS:
        params[f"e_{column.name}"] = []
    for node, records, events in issuances:
        for record in records:
            params["c_node"].append(node)
            for column in _CERTIFICATE_COLUMNS:
                params[f"c_{column.name}"].append(getattr(record, column.name))
        for event in events:
            params["e_node"].append(node)
            for column in _EVENT_COLUMNS:
                value = getattr(event, column.name)
                params[f"e_{column.name}"].append(
                    json.dumps(value) if column.name == "details" else value
                )
    return params
