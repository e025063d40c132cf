"""The backend behind every topology, run as its own process:

    python -m bench.dataplane.sink PORT

The first byte a client sends picks the mode: `B` (bulk) counts every later byte until the
client half-closes, then answers with the count as 8 big-endian bytes and closes; `E`
(echo) sends every later byte back until the client closes. It prints `ready` once
listening."""

from __future__ import annotations

import asyncio
import sys

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - the bench works without it, only slower
    HAVE_UVLOOP = False


class SinkProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.mode = b""
        self.count = 0
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.mode:
            self.mode, data = data[:1], data[1:]
        if self.mode == b"E":
            if data:
                self.transport.write(data)
        else:
            self.count += len(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.mode == b"B":
            self.transport.write(self.count.to_bytes(8, "big"))
        self.transport.close()
        return True


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    if HAVE_UVLOOP:
        uvloop.run(serve(port))
    else:
        asyncio.run(serve(port))


if __name__ == "__main__":
    main()
