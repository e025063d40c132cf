"""Replicas started together on an empty database (a Helm HA install) create one set of
authorities between them, on SQLite and on a real PostgreSQL: each start generates its root
and intermediate, but only the first to commit keeps them; the others use those."""

from __future__ import annotations

import threading
from pathlib import Path

from ca_server.app import CAServer
from ca_server.authority.kek import Kek
from ca_server.db.store import Store
from ca_server.domain import Authority
from tests.support.ca import ca_config


def test_replicas_starting_together_create_one_root_and_one_intermediate(
    tmp_path: Path, store: Store
) -> None:
    kek = Kek.generate()
    replicas = 3
    barrier = threading.Barrier(replicas)
    results: list[list[Authority]] = []
    errors: list[BaseException] = []

    def start(index: int) -> None:
        server = CAServer(ca_config(tmp_path / f"r{index}"))
        barrier.wait()
        try:
            results.append(server._load_authorities(store, kek))
        except BaseException as exc:  # reported below, with the others' results
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    with store.read() as tx:
        stored = tx.list_authorities()
    assert sorted(a.kind for a in stored) == ["intermediate", "root"]
    ids = {a.id for a in stored}
    assert len(results) == replicas
    for result in results:
        assert {a.id for a in result} == ids
