"""Join tokens: stored as SHA-256 hashes, consumed exactly once by one atomic conditional
UPDATE, so two CA replicas racing on the same token cannot both accept it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, or_, select, update

from ca_server.db.models import JOIN_TOKENS
from ca_server.db.txbase import TxBase, iso_time, opt_float
from ca_server.domain import JoinToken
from ca_server.errors import Unauthenticated

_T = JOIN_TOKENS.c


def _token(row: Any) -> JoinToken:
    return JoinToken(
        token_hash=row.token_hash,
        node_name=row.node_name,
        created_at=float(row.created_at),
        expires_at=float(row.expires_at),
        used_at=opt_float(row.used_at),
    )


class TokenOps(TxBase):
    def add_join_token(self, token: JoinToken) -> None:
        """Store a new join token (by hash). AlreadyExists if the hash is taken."""
        self._require_write("add_join_token")
        self._insert_one(
            JOIN_TOKENS,
            {
                "token_hash": token.token_hash,
                "node_name": token.node_name,
                "created_at": token.created_at,
                "expires_at": token.expires_at,
                "used_at": token.used_at,
            },
            what="join token",
        )

    def get_join_token(self, token_hash: str) -> JoinToken | None:
        row = self._exec(select(JOIN_TOKENS).where(_T.token_hash == token_hash)).one_or_none()
        return None if row is None else _token(row)

    def consume_join_token(self, token_hash: str, now: float) -> JoinToken:
        """Mark the token used at `now` and return it (with `used_at` set). Exactly one of
        any number of concurrent callers succeeds; the others get Unauthenticated saying
        why the token was refused (unknown, expired, already used)."""
        self._require_write("consume_join_token")
        consumed = self._exec(
            update(JOIN_TOKENS)
            .where(
                _T.token_hash == token_hash,
                _T.used_at.is_(None),
                _T.expires_at > now,
            )
            .values(used_at=now)
            .returning(*JOIN_TOKENS.c)
        ).one_or_none()
        if consumed is not None:
            return _token(consumed)
        existing = self.get_join_token(token_hash)
        if existing is None:
            raise Unauthenticated("join token is not known")
        if existing.used_at is not None:
            raise Unauthenticated(f"join token was already used at {iso_time(existing.used_at)}")
        raise Unauthenticated(f"join token expired at {iso_time(existing.expires_at)}")

    def prune_join_tokens(self, now: float) -> int:
        """Delete used and expired tokens; returns how many were deleted."""
        self._require_write("prune_join_tokens")
        result = self._exec(
            delete(JOIN_TOKENS).where(or_(_T.used_at.is_not(None), _T.expires_at <= now))
        )
        return int(result.rowcount)
