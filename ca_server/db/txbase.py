"""What every part of a store transaction (`ca_server.db.tx.Tx`) shares: the connection,
the read-only guard, error translation, dialect-specific upserts and the trust-state bump."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, CursorResult, Executable, Table, update
from sqlalchemy.dialects import postgresql, sqlite

from ca_server.db.failures import ReadOnlyTransactionError, translate_errors
from ca_server.db.models import TRUST_STATE
from ca_server.errors import FailedPrecondition, InvalidRequest


def iso_time(unix_seconds: float) -> str:
    """UNIX seconds as an ISO 8601 UTC time for messages, e.g. 2025-01-31T12:00:00Z."""
    moment = datetime.fromtimestamp(unix_seconds, tz=UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _increment(counter: str) -> Executable:
    """UPDATE the trust_state row's `counter` by one, RETURNING the new value."""
    column = TRUST_STATE.c[counter]
    return (
        update(TRUST_STATE)
        .where(TRUST_STATE.c.id == 1)
        .values({column: column + 1})
        .returning(column)
    )


_BUMP_BUNDLE_VERSION = _increment("bundle_version")
_BUMP_ACCESS_VERSION = _increment("access_version")


def missing_trust_state() -> FailedPrecondition:
    return FailedPrecondition(
        "the trust_state row is missing: this database was not set up by the meshtls "
        "migrations (run the CA's database upgrade)"
    )


def check_limit(limit: int) -> None:
    if limit < 1:
        raise InvalidRequest(f"page size must be at least 1 (got {limit})")


class TxBase:
    """One open database transaction. Not thread-safe: use it from the thread that
    opened it, inside its `with` block only."""

    def __init__(self, connection: Connection, *, writable: bool) -> None:
        self._conn = connection
        self._writable = writable
        self._access_changed = False

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def dialect(self) -> str:
        return self._conn.dialect.name

    def _require_write(self, operation: str) -> None:
        if not self._writable:
            raise ReadOnlyTransactionError(
                f"{operation} writes to the database: call it inside Store.transaction(), "
                "not Store.read()"
            )

    def _exec(
        self,
        statement: Executable,
        params: list[dict[str, Any]] | dict[str, Any] | None = None,
        *,
        what: str = "object",
    ) -> CursorResult[Any]:
        """Execute `statement`, translating driver errors into CA errors."""
        with translate_errors(what):
            return self._conn.execute(statement, params)

    def _insert_one(self, table: Table, values: dict[str, Any], *, what: str) -> None:
        """Insert one row inside a savepoint, so an `AlreadyExists` leaves the enclosing
        transaction usable (PostgreSQL aborts a whole transaction on any error)."""
        with translate_errors(what), self._conn.begin_nested():
            self._conn.execute(table.insert().values(**values))

    def _upsert(
        self,
        table: Table,
        values: dict[str, Any],
        overrides: Callable[[Any], dict[str, Any]] | None = None,
    ) -> None:
        """INSERT ... ON CONFLICT (primary key) DO UPDATE on either database: an existing
        row takes every value of `values`, except what `overrides(excluded)` computes
        (`excluded` is the proposed row, as in SQL)."""
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = dialect_insert(table).values(**values)
        keys = [column.name for column in table.primary_key.columns]
        update_set: dict[str, Any] = {
            name: statement.excluded[name] for name in values if name not in keys
        }
        if overrides is not None:
            update_set.update(overrides(statement.excluded))
        self._exec(statement.on_conflict_do_update(index_elements=keys, set_=update_set))

    def _bump_bundle_version(self) -> int:
        return self._bump(_BUMP_BUNDLE_VERSION)

    def _bump(self, increment: Executable) -> int:
        row = self._exec(increment).one_or_none()
        if row is None:
            raise missing_trust_state()
        return int(row[0])

    def _access_change(self) -> None:
        """Note that this transaction changes who may do what (a ban, a node's current
        certificate, an entry): `before_commit` bumps the access version once."""
        self._access_changed = True

    def before_commit(self) -> None:
        """The store calls this last in a write transaction, just before committing. The
        access version is bumped here, once, so the trust_state row is the last row a
        transaction locks (PostgreSQL): two transactions cannot each hold a row the other
        waits for and wait for it."""
        if self._access_changed:
            self._bump(_BUMP_ACCESS_VERSION)
            self._access_changed = False
