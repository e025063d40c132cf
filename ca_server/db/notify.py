"""PostgreSQL LISTEN/NOTIFY for trust-state changes between CA replicas.

`notify_trust_changed(tx)` queues a notification on the channel `meshtls_trust` inside the
transaction that changed authorities or revocations: PostgreSQL delivers it only when that
transaction commits (a rolled-back one notifies nobody), after the change is visible. The
payload is the new trust-bundle version. On SQLite it does nothing (there is no server to
carry it; replicas on one SQLite file follow the bundle version by polling).

`listen_connect_kwargs(url)` gives what psycopg needs to open the dedicated LISTEN
connection for the same database as the engine (`ca_server.services.cluster_events`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL

from ca_server.db.session import normalize_url, psycopg_connect_kwargs
from ca_server.db.tx import Tx

TRUST_CHANNEL = "meshtls_trust"


def notify_trust_changed(tx: Tx) -> int | None:
    """Tell every listening replica, on commit, that the trust state changed; return the
    version announced (None on SQLite, where nothing is sent)."""
    if tx.dialect != "postgresql":
        return None
    # The version as this transaction will commit it (it sees its own bump).
    version = tx.bundle_version()
    tx._exec(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": TRUST_CHANNEL, "payload": str(version)},
    )
    return version


def parse_payload(payload: str) -> int | None:
    """The version a notification announces, or None when it is not one of ours."""
    try:
        version = int(payload)
    except ValueError:
        return None
    return version if version >= 0 else None


def supports_notify(url: str | URL) -> bool:
    return normalize_url(url).get_backend_name() == "postgresql"


def listen_connect_kwargs(url: str | URL, *, connect_timeout: float = 5.0) -> dict[str, Any]:
    """psycopg.connect() keyword arguments for `url` (password included: never log them)."""
    return psycopg_connect_kwargs(
        url, connect_timeout=connect_timeout, application_name="meshtls-ca-listen"
    )
