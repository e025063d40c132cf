"""Registration entries: which SPIFFE IDs (with which DNS names and TTL) a node may obtain
for its workloads. At most one entry per (SPIFFE ID, node). An entry whose node is
`ALL_NODES` ("*") is served to every node (e.g. a workload a DaemonSet or the scheduler
may place anywhere); a node gets its own entries plus those."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, delete, func, select

from ca_server.db.models import ENTRIES
from ca_server.db.txbase import TxBase, check_limit
from ca_server.domain import Entry
from ca_server.errors import AlreadyExists, NotFound

_E = ENTRIES.c
_ENTRIES_FOR_NODE = (  # built once: it runs on the issuance path
    select(ENTRIES).where(_E.node_name == bindparam("node")).order_by(_E.spiffe_id, _E.id)
)

# The node name of entries for every node. Never a real node's name: node names start with
# a letter or digit.
ALL_NODES = "*"


def _entry(row: Any) -> Entry:
    return Entry(
        id=row.id,
        spiffe_id=row.spiffe_id,
        node_name=row.node_name,
        dns_names=tuple(row.dns_names),
        ttl_seconds=int(row.ttl_seconds),
        selectors=tuple(row.selectors),
        created_at=float(row.created_at),
    )


class EntryOps(TxBase):
    def add_entry(self, entry: Entry) -> None:
        """Store a new entry. AlreadyExists if its id, or its (SPIFFE ID, node) pair, is
        taken; the transaction stays usable after that error."""
        self._require_write("add_entry")
        try:
            self._insert_one(
                ENTRIES,
                {
                    "id": entry.id,
                    "spiffe_id": entry.spiffe_id,
                    "node_name": entry.node_name,
                    "dns_names": list(entry.dns_names),
                    "ttl_seconds": entry.ttl_seconds,
                    "selectors": list(entry.selectors),
                    "created_at": entry.created_at,
                },
                what="registration entry",
            )
        except AlreadyExists:
            if self.get_entry(entry.id) is not None:
                raise AlreadyExists(f"registration entry id {entry.id} already exists") from None
            raise AlreadyExists(
                f"a registration entry for {entry.spiffe_id} on node {entry.node_name!r} "
                "already exists"
            ) from None
        self._access_change()

    def get_entry(self, entry_id: str) -> Entry | None:
        row = self._exec(select(ENTRIES).where(_E.id == entry_id)).one_or_none()
        return None if row is None else _entry(row)

    def delete_entry(self, entry_id: str) -> Entry:
        """Delete the entry and return what was deleted. NotFound if unknown."""
        self._require_write("delete_entry")
        row = self._exec(
            delete(ENTRIES).where(_E.id == entry_id).returning(*ENTRIES.c)
        ).one_or_none()
        if row is None:
            raise NotFound(f"registration entry {entry_id} is not known")
        self._access_change()
        return _entry(row)

    def list_entries(
        self,
        *,
        node_name: str | None = None,
        spiffe_id: str | None = None,
        limit: int,
        after: str | None = None,
    ) -> list[Entry]:
        """Up to `limit` entries ordered by id, after the id `after`, optionally filtered."""
        check_limit(limit)
        statement = select(ENTRIES).order_by(_E.id).limit(limit)
        if node_name is not None:
            statement = statement.where(_E.node_name == node_name)
        if spiffe_id is not None:
            statement = statement.where(_E.spiffe_id == spiffe_id)
        if after is not None:
            statement = statement.where(_E.id > after)
        return [_entry(row) for row in self._exec(statement)]

    def entries_for_node(self, node_name: str) -> list[Entry]:
        """Every entry registered under exactly this node name (`ALL_NODES` for the entries
        of every node), ordered by SPIFFE ID."""
        return [_entry(row) for row in self._exec(_ENTRIES_FOR_NODE, {"node": node_name})]

    def count_entries(self) -> int:
        return int(self._exec(select(func.count()).select_from(ENTRIES)).scalar_one())
