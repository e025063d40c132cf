"""A batch of issuances recorded on PostgreSQL in one statement, on a connection of its own.

The group commit's everyday transaction is a batch of issuances: check that none of the
calling nodes is banned, insert their certificates, insert the certificates' audit
events. As a transaction that is six round trips on PostgreSQL (the pool's pre-ping,
BEGIN, the check, the two inserts, COMMIT), and under load each reply also waits for the
event loop to finish the call it is signing. `RECORD_ISSUANCES` does all three in one
statement (a CTE over the rows of each table, sent as one JSON array by
`record_issuances_params`), which PostgreSQL runs atomically in its own implicit
transaction on a connection in autocommit mode: nothing of it is written if any part
fails. Rows of a banned node are left out, and the statement returns the banned nodes'
names.

`IssuanceConnection` sends it: one psycopg asyncio connection per CA process, held open
for this statement alone, without SQLAlchemy's pool and its asyncio adapter around it.
That makes a batch one round trip (no pre-ping, no checkout), lets psycopg prepare the
statement on the server, and costs the event loop a fraction of the CPU. Instead of the
pool's pre-ping it polls its idle socket before each use: a server that restarted or
ended the session has said so (and closed) there, and the connection is replaced before
anything is sent.

SQLite keeps the three statements in its write transaction (`Tx.banned_nodes`,
`add_certificates`, `add_audit_events`): in-process, no round trips to save.
"""

from __future__ import annotations

import json
import logging
import select
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy import JSON, Column, Double
from sqlalchemy.engine import URL

from ca_server.db.failures import translate_errors
from ca_server.db.models import AUDIT_EVENTS, CERTIFICATES
from ca_server.db.session import POSTGRES_RECYCLE_SECONDS, psycopg_connect_kwargs
from ca_server.domain import AuditEvent, CertificateRecord

log = logging.getLogger(__name__)

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
    return f"json_to_recordset(CAST(%({parameter})s AS json)) AS r({fields})"


def _build() -> str:
    certificate_columns = ", ".join(c.name for c in _CERTIFICATE_COLUMNS)
    event_columns = ", ".join(c.name for c in _EVENT_COLUMNS)
    # Built from the schema's own column names, once; every value is a bound parameter
    # (psycopg's named placeholders).
    return f"""
        WITH banned AS (
            SELECT name FROM nodes
            WHERE name = ANY(CAST(%(nodes)s AS text[])) AND status = 'banned'
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


# Built once: the issuance hot path on PostgreSQL (from the schema's names, no input).
RECORD_ISSUANCES = _build()


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


class IssuanceConnection:
    """The connection one CA process records its issuances on (`RECORD_ISSUANCES`):
    opened on first use, in autocommit mode, with TCP keepalives, and replaced when it
    was lost, was left mid-statement, or has lived `POSTGRES_RECYCLE_SECONDS`. Driver
    failures surface as `Unavailable` (retryable) or `AlreadyExists`, as the store's."""

    def __init__(self, url: str | URL, *, connect_timeout: float = 5.0) -> None:
        self._params = psycopg_connect_kwargs(url, connect_timeout=connect_timeout)
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._opened_at = 0.0

    async def record(self, issuances: Sequence[Issuance]) -> set[str]:
        """Record `issuances` atomically, except those of banned nodes; return the banned
        nodes' names. AlreadyExists (nothing written) if a serial is already recorded."""
        params = record_issuances_params(issuances)
        with translate_errors("certificate"):
            connection = await self._usable()
            cursor = await connection.execute(RECORD_ISSUANCES, params)
            rows = await cursor.fetchall()
        return {str(row[0]) for row in rows}

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close()
            except Exception as error:  # closing a broken connection may fail; it is gone
                log.debug("closing the issuance connection failed", extra={"error": str(error)})

    async def _usable(self) -> psycopg.AsyncConnection[Any]:
        connection = self._connection
        if connection is not None:
            reason = self._unusable(connection)
            if reason:
                log.log(
                    logging.INFO if reason == "recycled" else logging.WARNING,
                    "replacing the issuance database connection",
                    extra={"reason": reason},
                )
                await self.aclose()
                connection = None
        if connection is None:
            connection = await psycopg.AsyncConnection.connect(autocommit=True, **self._params)
            self._connection, self._opened_at = connection, time.monotonic()
        return connection

    def _unusable(self, connection: psycopg.AsyncConnection[Any]) -> str:
        """Why `connection` must be replaced before use, or "" if it can be used."""
        if connection.closed or connection.broken:
            return "lost"
        if not _idle(connection):
            return "left mid-statement"  # never reuse it
        if _spoke_while_idle(connection):
            return "the server ended the session"
        if time.monotonic() - self._opened_at > POSTGRES_RECYCLE_SECONDS:
            return "recycled"
        return ""


def _idle(connection: psycopg.AsyncConnection[Any]) -> bool:
    return connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def _spoke_while_idle(connection: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server sent anything to a connection with no statement running. What
    it sends then is, but for the odd notice, the end of the session (a restart,
    `pg_terminate_backend`, an idle timeout) before it closes the socket; either way a
    new connection is the safe answer. Looking costs no round trip."""
    # poll, not select: a CA serving thousands of sidecars has descriptors past select's
    # FD_SETSIZE (1024).
    poller = select.poll()
    try:
        poller.register(connection.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True
