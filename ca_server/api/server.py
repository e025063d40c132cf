"""The CA's gRPC servers: one with the agent (mTLS) and enrollment (TLS) ports, one on the
admin Unix socket; both with standard health checking and reflection."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ca_server.api.admin import AdminServicer
from ca_server.api.agent import AgentServicer
from meshtls.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


def _options(max_message_bytes: int, reuse_port: bool = False) -> list[tuple[str, int]]:
    # SO_REUSEPORT only when this process shares its ports with its own workers: otherwise a
    # stale process on the same port would silently receive half of the connections.
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def _add_health_and_reflection(
    server: grpc.aio.Server, services: list[str]
) -> health.aio.HealthServicer:
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return health_servicer


def build_main_server(
    agent: AgentServicer,
    admin: AdminServicer,
    *,
    max_message_bytes: int,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server(options=_options(max_message_bytes, reuse_port))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    return server, _add_health_and_reflection(server, [AGENT_SERVICE, ADMIN_SERVICE])


def build_admin_server(
    admin: AdminServicer, socket_path: Path, *, max_message_bytes: int
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server(options=_options(max_message_bytes))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    health_servicer = _add_health_and_reflection(server, [ADMIN_SERVICE])
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    # The socket is created with the process umask: make it 0600 from birth, not after.
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix://{socket_path.resolve()}")
    finally:
        os.umask(old)
    return server, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, services: list[str]) -> None:
    for name in ["", *services]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
