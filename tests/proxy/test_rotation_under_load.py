"""Rotation under load: a real CA issues 60 s certificates that two real sidecars renew
every few seconds, while 50 clients stream data for 30 s through the client sidecar's
outbound listener and the server sidecar's inbound listener to an echo app. Every
connection must succeed and every echoed byte must be the byte sent; connections open
across a rotation keep working, new ones use the new certificates, and resumption is still
used between rotations."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshtls.identity.ids import SpiffeId
from sidecar.app import SidecarApp
from tests.proxy.helpers import (
    API,
    WEB,
    App,
    echo,
    inbound,
    outbound,
)
from tests.proxy.real import real_sidecar, sample, total
from tests.support.ca import running_ca

pytestmark = pytest.mark.slow

DURATION = 30.0
CLIENTS = 50
# A 60 s leaf is backdated 30 s, so it lives 90 s: renewing at 0.38 of that comes about
# 4 s after it was issued (the CA's minimum TTL is 60 s).
TTL = 60
RENEWAL = {
    "fraction": 0.38,
    "jitter": 0.01,
    "retry_initial_seconds": 0.5,
    "retry_max_seconds": 1,
    "refresh_seconds": 300,
}


@dataclass
class Load:
    connections: int = 0
    chunks: int = 0
    bytes: int = 0
    corrupted: int = 0
    failures: list[str] = field(default_factory=list)


async def client(port: int, seed: int, deadline: float, load: Load) -> None:
    """Connections of 0.5-3 s each, one after the other, until the deadline; every chunk
    must come back as sent, and each connection must end cleanly (EOF both ways)."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            load.failures.append(f"connect: {exc!r}")
            continue
        try:
            until = min(deadline, time.monotonic() + rng.uniform(0.5, 3.0))
            while time.monotonic() < until:
                chunk = rng.randbytes(rng.randint(1, 4096))
                writer.write(chunk)
                echoed = await asyncio.wait_for(reader.readexactly(len(chunk)), 15)
                if echoed != chunk:
                    load.corrupted += 1
                load.chunks += 1
                load.bytes += len(chunk)
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), 15)
            if rest:
                load.failures.append(f"{len(rest)} unexpected bytes after EOF")
            else:
                load.connections += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            load.failures.append(repr(exc))
        finally:
            writer.close()


def serial(app: SidecarApp, spiffe_id: str) -> str | None:
    held = app.manager.snapshot().by_spiffe_id(SpiffeId.parse(spiffe_id))
    return None if held is None else held.svid.serial


async def test_fifty_streams_survive_rotations_every_few_seconds(tmp_path: Path) -> None:
    async with running_ca(tmp_path / "ca-home") as ca:
        await ca.create_entry(WEB, "web-1", ttl_seconds=TTL)
        await ca.create_entry(API, "api-1", ttl_seconds=TTL)
        app = await App(echo).start()
        async with real_sidecar(
            tmp_path, ca, "web-1", renewal=RENEWAL, inbound=[inbound("web", app.address, [API])]
        ) as web:
            web_port = web.proxy.listeners["web"].bound
            assert web_port is not None
            async with real_sidecar(
                tmp_path,
                ca,
                "api-1",
                renewal=RENEWAL,
                outbound=[outbound("to-web", f"127.0.0.1:{web_port.port}")],
            ) as api:
                out = api.proxy.listeners["to-web"].bound
                assert out is not None
                seen: dict[str, set[str]] = {WEB: set(), API: set()}
                contexts: set[int] = set()
                load = Load()
                deadline = time.monotonic() + DURATION

                async def watch() -> None:
                    while time.monotonic() < deadline:
                        for sidecar, spiffe_id in ((web, WEB), (api, API)):
                            if (current := serial(sidecar, spiffe_id)) is not None:
                                seen[spiffe_id].add(current)
                        context = web.proxy.listeners["web"].context()
                        if context is not None:
                            contexts.add(id(context))
                        await asyncio.sleep(0.1)

                watcher = asyncio.create_task(watch())
                await asyncio.gather(
                    *(client(out.port, seed, deadline, load) for seed in range(CLIENTS))
                )
                await watcher

                assert load.failures == []
                assert load.corrupted == 0
                assert load.connections >= 2 * CLIENTS, load
                # Both identities rotated many times, and the server's listener followed.
                assert len(seen[WEB]) >= 5, seen
                assert len(seen[API]) >= 5, seen
                assert len(contexts) >= 5
                for sidecar, name in ((web, "web"), (api, "to-web")):
                    assert total(sidecar, "meshtls_proxy_refused_total", listener=name) == 0
                    closed = total(sidecar, "meshtls_proxy_connections_total", listener=name)
                    ok = sample(
                        sidecar, "meshtls_proxy_connections_total", listener=name, result="ok"
                    )
                    assert ok == closed == load.connections
                accepted = sample(
                    api, "meshtls_proxy_handshakes_total", listener="to-web", result="accepted"
                )
                resumed = sample(api, "meshtls_proxy_resumed_handshakes_total", listener="to-web")
                # Between rotations connections resume; after each one they cannot.
                assert 0 < resumed < accepted
        await app.stop()
