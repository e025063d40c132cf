"""Reloading the listener set: unchanged listeners keep their sockets and take new
settings, new ones bind, removed ones drain; a set that cannot be applied (an address in
use) or an invalid config file is rejected and the old listeners keep running."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from sidecar.proxy.config import InboundConfig
from sidecar.proxy.reload import reload_proxy
from sidecar.proxy.service import ReloadError
from tests.proxy.helpers import (
    API,
    WEB,
    App,
    LogRecords,
    Mesh,
    echo,
    exchange,
    inbound,
    outbound,
    parse,
    port_of,
)
from tests.sidecar.helpers import config_from, sidecar_document, write_config


async def test_reload_keeps_adds_and_removes_listeners(mesh: Mesh) -> None:
    mesh.issue(WEB)
    mesh.issue(API)
    app = await App(echo).start()
    server = await mesh.serve(inbound=[inbound("web", app.address, [API])])
    web = f"127.0.0.1:{port_of(server, 'web')}"
    client = await mesh.serve(outbound=[outbound("a", web), outbound("b", web)])
    port_a, port_b = port_of(client, "a"), port_of(client, "b")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_b)  # open across it
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    listener_a = client.listeners["a"]
    a_fixed = outbound("a", web, idle_timeout_seconds=60)
    a_fixed["listen"] = f"127.0.0.1:{port_a}"
    await client.reload(parse({"outbound": [a_fixed, outbound("c", web)]}))
    assert client.listeners["a"] is listener_a  # same socket, new settings
    assert listener_a.config.limits.idle_timeout_seconds == 60
    assert set(client.listeners) == {"a", "c"}
    assert await exchange(port_a, b"a") == b"a"
    assert await exchange(port_of(client, "c"), b"c") == b"c"
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port_b)
    writer.write(b"y")  # the removed listener's open connection keeps working
    assert await reader.readexactly(1) == b"y"
    writer.close()


async def test_a_listener_set_that_cannot_bind_is_rejected_whole(mesh: Mesh) -> None:
    mesh.issue(WEB)
    mesh.issue(API)
    app = await App(echo).start()
    server = await mesh.serve(inbound=[inbound("web", app.address, [API])])
    web = f"127.0.0.1:{port_of(server, 'web')}"
    client = await mesh.serve(outbound=[outbound("a", web)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = outbound("busy", web)
        busy["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ReloadError, match="outbound listener busy cannot listen on"):
            await client.reload(parse({"outbound": [outbound("fresh", web), busy]}))
    assert set(client.listeners) == {"a"}
    assert await exchange(port_of(client, "a"), b"still a") == b"still a"


async def test_an_invalid_config_file_is_rejected_and_the_old_listeners_stay(
    mesh: Mesh, tmp_path: Path, proxy_logs: LogRecords
) -> None:
    mesh.issue(WEB)
    mesh.issue(API)
    app = await App(echo).start()
    doc = sidecar_document(
        tmp_path, agent_address="127.0.0.1:1", enroll_address="127.0.0.1:2", bundle_path=None
    )
    doc["ca"]["root_fingerprint"] = "0" * 64
    doc["inbound"] = [inbound("web", app.address, [API])]
    config = config_from(tmp_path, doc)
    server = await mesh.serve(inbound=list(doc["inbound"]))
    port = port_of(server, "web")
    doc["inbound"][0]["allow"] = ["not an id"]
    write_config(tmp_path / "sidecar.yaml", doc)
    assert not await reload_proxy(config, server)
    assert any("config reload rejected" in r.getMessage() for r in proxy_logs.records)
    assert server.listeners["web"].bound is not None
    assert server.listeners["web"].bound.port == port
    # A valid change of a section that is not reloaded says a restart is needed.
    doc["inbound"][0]["allow"] = [API, WEB]
    doc["inbound"][0]["listen"] = f"127.0.0.1:{port}"
    doc["renewal"]["refresh_seconds"] = 600
    write_config(tmp_path / "sidecar.yaml", doc)
    assert await reload_proxy(config, server)
    web_config = server.listeners["web"].config
    assert isinstance(web_config, InboundConfig)
    assert web_config.allow.allows(web_config.identity)
    assert any("restart the sidecar" in r.getMessage() for r in proxy_logs.records)
