"""Translate database driver failures into the CA's error tree at the store boundary:
unique-key violations become `AlreadyExists`, lost or refused connections, lock timeouts
and pool exhaustion become `Unavailable` (retryable). Messages never carry passwords."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import exc as sa_exc

from ca_server.db.session import scrub_secrets
from ca_server.errors import AlreadyExists, Unavailable

log = logging.getLogger(__name__)

# How long a caller should wait before retrying after the database was unavailable.
RETRY_AFTER_SECONDS = 1.0

_PG_UNIQUE_VIOLATION = "23505"
# PostgreSQL SQLSTATE classes that mean "try again": connection exceptions, insufficient
# resources, operator intervention (shutdown), serialization failures and deadlocks.
_PG_RETRYABLE_PREFIXES = ("08", "53", "57", "40")


class ReadOnlyTransactionError(Exception):
    """A write was attempted inside `Store.read()`; this is a bug in the caller."""


def is_unique_violation(error: sa_exc.IntegrityError) -> bool:
    """True when `error` is a unique or primary key violation (not e.g. a NOT NULL one)."""
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return bool(sqlstate == _PG_UNIQUE_VIOLATION)
    return "UNIQUE constraint failed" in str(orig)


def _reason(error: BaseException) -> str:
    """A one-line, password-free description of a driver error."""
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return scrub_secrets(first)


def _is_retryable_sqlstate(error: BaseException | None) -> bool:
    sqlstate = getattr(error, "sqlstate", None)
    return sqlstate is not None and str(sqlstate).startswith(_PG_RETRYABLE_PREFIXES)


def _is_unavailable(error: sa_exc.SQLAlchemyError) -> bool:
    if isinstance(error, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated or _is_retryable_sqlstate(error.orig):
            return True
        # Refused/lost connections and SQLite "database is locked"/I/O errors.
        return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
    return False


def unavailable(error: BaseException) -> Unavailable:
    """The `Unavailable` to raise for a driver failure, logged once here."""
    reason = _reason(error)
    log.warning(
        "database unavailable",
        extra={"reason": reason, "error_type": type(error).__name__},
    )
    return Unavailable(f"database unavailable: {reason}", retry_after=RETRY_AFTER_SECONDS)


@contextmanager
def translate_errors(what: str = "object") -> Iterator[None]:
    """Map SQLAlchemy failures raised inside the block to CA errors, and those of psycopg
    used directly (the issuance connection, `ca_server.db.issuance`). `what` names the
    object for an `AlreadyExists` message ("registration entry", "certificate", ...)."""
    try:
        yield
    except sa_exc.IntegrityError as error:
        if is_unique_violation(error):
            raise AlreadyExists(f"{what} already exists") from error
        raise
    except sa_exc.SQLAlchemyError as error:
        if _is_unavailable(error):
            raise unavailable(error) from error
        raise
    except psycopg.Error as error:
        if error.sqlstate == _PG_UNIQUE_VIOLATION:
            raise AlreadyExists(f"{what} already exists") from error
        if _is_retryable_sqlstate(error) or isinstance(
            error, psycopg.OperationalError | psycopg.InterfaceError
        ):
            raise unavailable(error) from error
        raise
