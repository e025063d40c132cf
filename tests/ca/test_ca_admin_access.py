"""Who may reach the admin API, and how the CA reports its health: the admin socket is
private (mode 0600); the CLI without a server says how to fix it; on the agent listener
only a node whose SPIFFE ID is in admin_spiffe_ids is an admin; standard gRPC health
answers SERVING on the admin socket and the agent listener."""

from __future__ import annotations

import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_server.api.server import ADMIN_SERVICE, AGENT_SERVICE
from meshtls.v1 import admin_pb2, admin_pb2_grpc
from tests.ca.helpers import (
    RPC_TIMEOUT,
    assert_one_line_refusal,
    db_state,
    enroll_node,
    enrollment_channel,
    node_channel,
    rpc_error,
    run_cli,
)
from tests.support.ca import RunningCA, running_ca

pytestmark = pytest.mark.asyncio(loop_scope="module")

TD = "example.org"
ADMIN_NODE = "ops-1"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ca(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningCA]:
    async with running_ca(
        tmp_path_factory.mktemp("admin-access"),
        trust_domain=TD,
        admin_spiffe_ids=(f"spiffe://{TD}/meshtls/node/{ADMIN_NODE}",),
    ) as running:
        yield running


async def test_admin_socket_is_private(ca: RunningCA) -> None:
    mode = ca.admin_socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_cli_without_a_server_says_how_to_fix_it(tmp_path: Path) -> None:
    empty = tmp_path / "no-ca-here"
    result = await run_cli("status", "--data-dir", empty)
    assert_one_line_refusal(result, str(empty / "admin.sock"), "meshtls-ca serve", "--data-dir")

    # A socket file left behind by a CA that is gone.
    stale = tmp_path / "stale"
    stale.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale / "admin.sock"))
    listener.close()
    result = await run_cli("status", "--data-dir", stale)
    assert_one_line_refusal(result, "cannot reach the CA", "meshtls-ca serve")


async def test_admin_api_on_agent_listener_needs_an_admin_spiffe_id(ca: RunningCA) -> None:
    plain = await enroll_node(ca, "not-an-admin")
    admin = await enroll_node(ca, ADMIN_NODE)
    before = db_state(ca)
    async with node_channel(ca, plain) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        refused = [
            await rpc_error(stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT)),
            await rpc_error(
                stub.CreateJoinToken(
                    admin_pb2.CreateJoinTokenRequest(node_name="sneaky"), timeout=RPC_TIMEOUT
                )
            ),
        ]
    for error in refused:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not-an-admin is not an admin" in (error.details() or "")
    assert db_state(ca) == before

    async with enrollment_channel(ca) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        error = await rpc_error(stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    async with node_channel(ca, admin) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT)
    assert status.trust_domain == TD


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    return int(answer.status)


async def test_grpc_health_on_admin_socket_and_agent_listener(ca: RunningCA) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(f"unix://{ca.admin_socket.resolve()}") as channel:
        for service in ("", ADMIN_SERVICE):
            assert await _health(channel, service) == serving
    node = await enroll_node(ca, "health-1")
    async with node_channel(ca, node) as channel:
        for service in ("", AGENT_SERVICE, ADMIN_SERVICE):
            assert await _health(channel, service) == serving
