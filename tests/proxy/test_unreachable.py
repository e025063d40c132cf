"""An upstream that refuses connections (the app behind an inbound listener, the remote
sidecar behind an outbound one): the connection is refused as `upstream_unreachable`,
finishes (one access-log line, nothing left open) and a drain ends at once. Run on
asyncio's loop and on uvloop, which makes the upstream protocol before it connects."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from tests.proxy.helpers import (
    API,
    WEB,
    LogRecords,
    Mesh,
    answer_or_reset,
    eventually,
    inbound,
    outbound,
)
from tests.proxy.helpers import port_of as bound_port

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def refused_then_drained(mesh: Mesh, kind: str) -> None:
    mesh.issue(WEB)
    mesh.issue(API)
    dead = f"127.0.0.1:{closed_port()}"
    if kind == "inbound":
        server = await mesh.serve(inbound=[inbound("web", dead, [API])])
        client = await mesh.serve(
            outbound=[outbound("to-web", f"127.0.0.1:{bound_port(server, 'web')}")]
        )
        service, name = server, "web"
    else:
        client = await mesh.serve(outbound=[outbound("to-web", dead)])
        service, name = client, "to-web"
    assert await answer_or_reset(bound_port(client, "to-web"), b"hello") in (b"", None)
    listener = service.listeners[name]
    await eventually(lambda: not listener.active, "the refused connection to finish", within=5)
    assert (
        mesh.metric("meshtls_proxy_refused_total", listener=name, reason="upstream_unreachable")
        == 1
    )
    await asyncio.wait_for(service.drain(), 5)


@pytest.mark.parametrize("kind", ["inbound", "outbound"])
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_an_unreachable_upstream_refuses_and_finishes(
    tmp_path: Path, loop: str, kind: str, proxy_logs: LogRecords
) -> None:
    async def main() -> None:
        mesh = Mesh(tmp_path)
        try:
            await refused_then_drained(mesh, kind)
        finally:
            await mesh.close()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())
    (record,) = proxy_logs.with_reason("upstream_unreachable")
    assert "cannot connect to" in record.getMessage()
    access = [r for r in proxy_logs.access() if getattr(r, "result", None) == "refused"]
    assert [getattr(r, "reason", None) for r in access] == ["upstream_unreachable"]
