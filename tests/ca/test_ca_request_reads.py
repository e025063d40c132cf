"""What one agent call costs the database: with cold caches, a SignIdentities call reads
the caller's node, its certificate and its entries in ONE read transaction (every call of
a production fleet is a cold one: each node calls every few minutes); a warm call reads
nothing."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import Connection, event

from ca_server.db.session import TX_KIND_OPTION, TX_READ
from meshtls.v1 import agent_pb2_grpc
from tests.ca.helpers import enroll_node, key_and_csr, node_channel, sign_one, store_of
from tests.support.ca import RunningCA, running_ca

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ca(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningCA]:
    async with running_ca(tmp_path_factory.mktemp("reads")) as running:
        yield running


async def test_a_cold_call_reads_its_caller_and_entries_in_one_transaction(
    ca: RunningCA,
) -> None:
    node = await enroll_node(ca, "reads-1")
    entry = await ca.create_entry("spiffe://example.org/svc/reads", "reads-1")
    assert ca.server is not None
    ctx = ca.server.ctx
    assert ctx is not None
    loop_thread = threading.get_ident()
    reads: list[int] = []

    def on_begin(connection: Connection) -> None:
        # Request-path reads run inline on the loop (SQLite); background reads use threads.
        is_read = connection.get_execution_options().get(TX_KIND_OPTION) == TX_READ
        if is_read and threading.get_ident() == loop_thread:
            reads.append(1)

    engine = store_of(ca).engine
    event.listen(engine, "begin", on_begin)
    try:
        async with node_channel(ca, node) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            ctx.auth_cache.clear()
            ctx.entries_cache.clear()
            await sign_one(stub, entry, key_and_csr()[1])
            cold = len(reads)
            await sign_one(stub, entry, key_and_csr()[1])
            warm = len(reads) - cold
    finally:
        event.remove(engine, "begin", on_begin)
    assert (cold, warm) == (1, 0)
