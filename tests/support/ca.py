"""A real CA for tests: the production `CAServer` in-process, with real gRPC listeners on
127.0.0.1, real TLS and a real SQLite (or PostgreSQL) database in a temp dir.

It can be stopped (a CA outage) and started again on the same ports with the same data."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc

from ca_server.app import CAServer
from ca_server.config import CAConfig, HostPort, validate
from meshtls.clock import Clock
from meshtls.v1 import admin_pb2, admin_pb2_grpc, types_pb2


class RunningCA:
    def __init__(self, config: CAConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock
        self.server: CAServer | None = None
        self.agent_address = ""
        self.enroll_address = ""
        self.bundle_pem = b""

    @property
    def trust_domain(self) -> str:
        return self.config.trust_domain

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def admin_socket(self) -> Path:
        return self.config.admin_socket_path

    async def start(self) -> None:
        """Serve (again). After the first start the ports are fixed, so clients reconnect."""
        if self.server is not None:
            return
        server = CAServer(self.config, clock=self.clock)
        addresses = await server.start()
        self.server = server
        if not self.agent_address:
            self.agent_address, self.enroll_address = addresses.agent, addresses.enrollment
            agent_port = int(addresses.agent.rsplit(":", 1)[1])
            enroll_port = int(addresses.enrollment.rsplit(":", 1)[1])
            self.config = dataclasses.replace(
                self.config,
                listen=HostPort("127.0.0.1", agent_port),
                enroll_listen=HostPort("127.0.0.1", enroll_port),
            )
        assert server.ctx is not None
        self.bundle_pem = server.ctx.trust.snapshot.roots_pem

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=0.5)
            self.server = None

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[admin_pb2_grpc.AdminServiceStub]:
        async with grpc.aio.insecure_channel(f"unix://{self.admin_socket.resolve()}") as channel:
            yield admin_pb2_grpc.AdminServiceStub(channel)

    async def create_join_token(self, node: str, ttl_seconds: int = 600) -> str:
        async with self.admin() as stub:
            answer = await stub.CreateJoinToken(
                admin_pb2.CreateJoinTokenRequest(node_name=node, ttl_seconds=ttl_seconds)
            )
        return str(answer.token)

    async def create_entry(
        self,
        spiffe_id: str,
        node: str,
        *,
        dns_names: Sequence[str] = (),
        ttl_seconds: int = 3600,
        selectors: Sequence[str] = (),
    ) -> str:
        async with self.admin() as stub:
            entry = await stub.CreateEntry(
                admin_pb2.CreateEntryRequest(
                    spiffe_id=spiffe_id,
                    node_name=node,
                    dns_names=list(dns_names),
                    ttl_seconds=ttl_seconds,
                    selectors=list(selectors),
                )
            )
        return str(entry.id)

    async def revoke(self, serial: str, reason: str = "test") -> None:
        async with self.admin() as stub:
            await stub.RevokeCertificate(
                admin_pb2.RevokeCertificateRequest(serial=serial, reason=reason)
            )

    async def ban(self, node: str) -> None:
        async with self.admin() as stub:
            await stub.BanNode(admin_pb2.BanNodeRequest(name=node, reason="test"))

    async def bundle(self) -> types_pb2.TrustBundle:
        async with self.admin() as stub:
            bundle: types_pb2.TrustBundle = await stub.GetTrustBundle(
                types_pb2.GetTrustBundleRequest()
            )
        return bundle


def ca_config(tmp_path: Path, **overrides: Any) -> CAConfig:
    """A config for a test CA: dev KEK, ephemeral loopback ports, no HTTP endpoint."""
    base = CAConfig(
        trust_domain=overrides.pop("trust_domain", "example.org"),
        data_dir=tmp_path / "ca",
        listen=HostPort("127.0.0.1", 0),
        enroll_listen=HostPort("127.0.0.1", 0),
        http_listen=None,
        dev=True,
    )
    config = dataclasses.replace(base, **overrides)
    validate(config)
    return config


@asynccontextmanager
async def running_ca(
    tmp_path: Path,
    *,
    trust_domain: str = "example.org",
    clock: Clock | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningCA]:
    ca = RunningCA(ca_config(tmp_path, trust_domain=trust_domain, **overrides), clock)
    await ca.start()
    try:
        yield ca
    finally:
        await ca.stop()
