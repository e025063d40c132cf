"""Enrolled nodes (agents): their identity, status (active/banned), the serial of the one
node certificate the CA currently accepts from them, and when they were last seen."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, case, func, literal, select, update

from ca_server.db.models import NODES
from ca_server.db.txbase import TxBase, check_limit, opt_float
from ca_server.domain import Node
from ca_server.errors import NotFound

_N = NODES.c
# The statements of the issuance hot path, built once: building a statement costs about
# twice as much as running it on SQLite.
_GET_NODE = select(NODES).where(_N.name == bindparam("name"))
_BANNED_AMONG = select(_N.name).where(
    _N.name.in_(bindparam("names", expanding=True)), _N.status == "banned"
)


def _node(row: Any) -> Node:
    return Node(
        name=row.name,
        spiffe_id=row.spiffe_id,
        status=row.status,
        current_serial=row.current_serial,
        enrolled_at=float(row.enrolled_at),
        last_seen_at=opt_float(row.last_seen_at),
        certificate_expires_at=opt_float(row.certificate_expires_at),
        pending_serial=row.pending_serial,
    )


def _unknown(name: str) -> NotFound:
    return NotFound(f"node {name!r} is not known")


class NodeOps(TxBase):
    def get_node(self, name: str) -> Node | None:
        row = self._exec(_GET_NODE, {"name": name}).one_or_none()
        return None if row is None else _node(row)

    def upsert_node(self, node: Node) -> None:
        """Insert the node or replace every field of the stored one. The ban time is kept
        while the node stays banned and cleared when it becomes active again."""
        self._require_write("upsert_node")
        self._upsert(
            NODES,
            {
                "name": node.name,
                "spiffe_id": node.spiffe_id,
                "status": node.status,
                "current_serial": node.current_serial,
                "enrolled_at": node.enrolled_at,
                "last_seen_at": node.last_seen_at,
                "certificate_expires_at": node.certificate_expires_at,
                "pending_serial": node.pending_serial,
                "banned_at": None,
            },
            lambda excluded: {
                "banned_at": case((excluded.status == "banned", _N.banned_at), else_=literal(None))
            },
        )
        self._access_change()

    def set_node_certificate(self, name: str, serial: str, expires_at: float, now: float) -> None:
        """Record the node's new current certificate (the only one accepted from now on)."""
        self._require_write("set_node_certificate")
        result = self._exec(
            update(NODES)
            .where(_N.name == name)
            .values(current_serial=serial, certificate_expires_at=expires_at, last_seen_at=now)
        )
        if result.rowcount == 0:
            raise _unknown(name)
        self._access_change()

    def set_node_pending_certificate(self, name: str, serial: str, now: float) -> None:
        """Record a renewed certificate; it becomes current when the node first uses it."""
        self._require_write("set_node_pending_certificate")
        result = self._exec(
            update(NODES).where(_N.name == name).values(pending_serial=serial, last_seen_at=now)
        )
        if result.rowcount == 0:
            raise _unknown(name)

    def promote_node_certificate(
        self, name: str, serial: str, expires_at: float, now: float
    ) -> bool:
        """Make the pending certificate `serial` current (the previous one stops being
        accepted). False when `serial` is no longer the pending one."""
        self._require_write("promote_node_certificate")
        result = self._exec(
            update(NODES)
            .where(_N.name == name, _N.pending_serial == serial)
            .values(
                current_serial=serial,
                pending_serial=None,
                certificate_expires_at=expires_at,
                last_seen_at=now,
            )
        )
        if not result.rowcount:
            return False
        self._access_change()
        return True

    def touch_node(self, name: str, now: float) -> None:
        self._require_write("touch_node")
        result = self._exec(update(NODES).where(_N.name == name).values(last_seen_at=now))
        if result.rowcount == 0:
            raise _unknown(name)

    def ban_node(self, name: str, now: float) -> Node:
        """Ban the node (idempotent: a second ban keeps the first ban time)."""
        self._require_write("ban_node")
        row = self._exec(
            update(NODES)
            .where(_N.name == name)
            .values(status="banned", banned_at=func.coalesce(_N.banned_at, now))
            .returning(*NODES.c)
        ).one_or_none()
        if row is None:
            raise _unknown(name)
        self._access_change()
        return _node(row)

    def banned_nodes(self, names: Iterable[str]) -> set[str]:
        """Which of `names` are banned, in one query."""
        wanted = sorted(set(names))
        if not wanted:
            return set()
        return {row.name for row in self._exec(_BANNED_AMONG, {"names": wanted})}

    def node_banned_at(self, name: str) -> float | None:
        """When the node was banned (None if it is not banned). NotFound if unknown."""
        row = self._exec(select(_N.banned_at).where(_N.name == name)).one_or_none()
        if row is None:
            raise _unknown(name)
        return opt_float(row.banned_at)

    def list_nodes(self, *, limit: int, after: str | None = None) -> list[Node]:
        """Up to `limit` nodes ordered by name, starting after the name `after`."""
        check_limit(limit)
        statement = select(NODES).order_by(_N.name).limit(limit)
        if after is not None:
            statement = statement.where(_N.name > after)
        return [_node(row) for row in self._exec(statement)]

    def count_nodes(self) -> int:
        return int(self._exec(select(func.count()).select_from(NODES)).scalar_one())
