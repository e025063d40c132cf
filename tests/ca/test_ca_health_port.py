"""The plaintext gRPC health port for probes that cannot speak TLS (the kubelet's grpc
probe): liveness on service "", readiness (database answers, signing intermediate valid) on
"readiness", nothing else; refused off loopback unless the operator allows it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_server.config import HostPort, load
from ca_server.errors import ConfigError
from meshtls.clock import ManualClock
from tests.support.ca import running_ca

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(answer.status)


async def test_probe_port_answers_liveness_and_readiness(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running_ca(tmp_path, clock=clock, health_listen=HostPort("127.0.0.1", 0)) as ca:
        assert ca.server is not None
        port = ca.server.health_port
        assert port
        assert await check(port, "") == SERVING
        assert await check(port, "readiness") == SERVING
        assert await check(port, "meshtls.v1.AgentService") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await check(port, "meshtls.v1.AdminService")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # Past the signing intermediate's end the replica is alive but not ready.
        signer = ca.server.ctx.trust.keyring.signer  # type: ignore[union-attr]
        clock.set_sync(signer.not_after + 1)
        assert await check(port, "") == SERVING
        assert await check(port, "readiness") == NOT_SERVING


async def test_probe_port_is_off_by_default(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        assert ca.server is not None
        assert ca.server.health_port is None


def test_probe_port_off_loopback_needs_allow_public_listen(tmp_path: Path) -> None:
    config = tmp_path / "ca.yaml"
    config.write_text(f"data_dir: {tmp_path}\nhealth_listen: 0.0.0.0:8481\n")
    with pytest.raises(ConfigError, match=r"health_listen: 0\.0\.0\.0:8481 is not a loopback"):
        load(file=config, overrides={})
    config.write_text(
        f"data_dir: {tmp_path}\nhealth_listen: 0.0.0.0:8481\nallow_public_listen: true\n"
    )
    assert load(file=config, overrides={}).health_listen == HostPort("0.0.0.0", 8481)
    config.write_text(f"data_dir: {tmp_path}\nhealth_listen: 'off'\n")
    assert load(file=config, overrides={}).health_listen is None
