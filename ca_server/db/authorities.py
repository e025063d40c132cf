"""CA authorities (roots and intermediates) with their encrypted keys and rotation state.
Any change bumps the trust-state version, since the trust bundle is derived from them."""

from __future__ import annotations

from typing import Any, get_args

from sqlalchemy import bindparam, select, update

from ca_server.db.models import AUTHORITIES
from ca_server.db.txbase import TxBase
from ca_server.domain import Authority, AuthorityState
from ca_server.errors import InvalidRequest, NotFound

_A = AUTHORITIES.c
_STATES: tuple[str, ...] = get_args(AuthorityState)
# The signing fence's heartbeat reads this several times a second: ids and states only
# (no certificates or encrypted keys), and the statement is built once.
_STATES_OF_KIND = select(_A.id, _A.state).where(_A.kind == bindparam("kind"))


def _authority(row: Any) -> Authority:
    key = row.encrypted_key
    return Authority(
        id=row.id,
        kind=row.kind,
        state=row.state,
        parent_id=row.parent_id,
        cert_pem=row.cert_pem,
        encrypted_key=None if key is None else bytes(key),
        upstream=bool(row.upstream),
        fingerprint_sha256=row.fingerprint_sha256,
        subject=row.subject,
        not_before=float(row.not_before),
        not_after=float(row.not_after),
        created_at=float(row.created_at),
        chain_pem=row.chain_pem,
    )


class AuthorityOps(TxBase):
    def add_authority(self, authority: Authority) -> None:
        """Store a new authority. AlreadyExists if its id is taken."""
        self._require_write("add_authority")
        self._insert_one(
            AUTHORITIES,
            {
                "id": authority.id,
                "kind": authority.kind,
                "state": authority.state,
                "parent_id": authority.parent_id,
                "cert_pem": authority.cert_pem,
                "encrypted_key": authority.encrypted_key,
                "upstream": authority.upstream,
                "fingerprint_sha256": authority.fingerprint_sha256,
                "subject": authority.subject,
                "not_before": authority.not_before,
                "not_after": authority.not_after,
                "created_at": authority.created_at,
                "chain_pem": authority.chain_pem,
                "state_changed_at": authority.created_at,
            },
            what=f"authority {authority.id}",
        )
        self._bump_bundle_version()

    def get_authority(self, authority_id: str) -> Authority | None:
        row = self._exec(select(AUTHORITIES).where(_A.id == authority_id)).one_or_none()
        return None if row is None else _authority(row)

    def list_authorities(self) -> list[Authority]:
        """Every authority, oldest first."""
        statement = select(AUTHORITIES).order_by(_A.created_at, _A.id)
        return [_authority(row) for row in self._exec(statement)]

    def intermediate_states(self) -> dict[str, AuthorityState]:
        """Each intermediate's id and state, without its certificate or key."""
        rows = self._exec(_STATES_OF_KIND, {"kind": "intermediate"})
        return {row.id: row.state for row in rows}

    def set_authority_state(self, authority_id: str, state: AuthorityState, now: float) -> None:
        """Move an authority to `state` (recording when). NotFound if unknown; setting the
        state it already has changes nothing."""
        self._require_write("set_authority_state")
        if state not in _STATES:
            raise InvalidRequest(f"authority state must be one of {', '.join(_STATES)}")
        changed = self._exec(
            update(AUTHORITIES)
            .where(_A.id == authority_id, _A.state != state)
            .values(state=state, state_changed_at=now)
        ).rowcount
        if changed:
            self._bump_bundle_version()
        elif self.get_authority(authority_id) is None:
            raise NotFound(f"authority {authority_id} is not known")

    def authority_state_changed_at(self, authority_id: str) -> float:
        """When the authority last changed state (its creation time if never)."""
        row = self._exec(select(_A.state_changed_at).where(_A.id == authority_id)).one_or_none()
        if row is None:
            raise NotFound(f"authority {authority_id} is not known")
        return float(row.state_changed_at)
