"""The CA's loopback HTTP endpoint over a real socket."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

from ca_server.config import HostPort
from tests.support.ca import running_ca


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback test URL
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_health_readiness_and_metrics(tmp_path: Path) -> None:
    async with running_ca(tmp_path, http_listen=HostPort("127.0.0.1", 0)) as ca:
        assert ca.server is not None
        assert ca.server.addresses is not None
        base = f"http://{ca.server.addresses.http}"
        await ca.create_join_token("web-1")
        assert await asyncio.to_thread(_get, base + "/healthz") == (200, "ok\n")
        assert await asyncio.to_thread(_get, base + "/readyz") == (200, "ready\n")
        status, metrics = await asyncio.to_thread(_get, base + "/metrics")
        assert status == 200
        assert "meshtls_ca_authority_expiry_seconds{authority=" in metrics
        assert "meshtls_ca_request_seconds_count" in metrics
        status, _ = await asyncio.to_thread(_get, base + "/nope")
        assert status == 404


async def test_http_endpoint_is_off_when_disabled(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        assert ca.server is not None
        assert ca.server.addresses is not None
        assert ca.server.addresses.http is None
