"""The demo's two sample services, each its own process, knowing nothing about TLS:

python scripts/demo/apps.py api PORT
    an HTTP server behind the api sidecar's inbound listener; it reads the PROXY v2
    header the sidecar sends first and answers with the caller's SPIFFE ID.
python scripts/demo/apps.py web URL [INTERVAL]
    calls URL (the web sidecar's outbound listener) every INTERVAL seconds and prints
    one line per request: `ok N <answer>` or `fail N <why>`.
"""

from __future__ import annotations

import asyncio
import struct
import sys
import time
import urllib.request

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
TLV_SPIFFE_ID = 0xE0  # the sidecar's custom PROXY v2 TLV (docs/DATAPLANE.md)


def spiffe_id_from_proxy_header(payload: bytes, family: int) -> str | None:
    """Walk the TLVs after the addresses of a PROXY v2 header."""
    offset = {0x11: 12, 0x21: 36}.get(family, 0)
    while offset + 3 <= len(payload):
        kind, length = struct.unpack_from("!BH", payload, offset)
        value = payload[offset + 3 : offset + 3 + length]
        if kind == TLV_SPIFFE_ID:
            return value.decode()
        offset += 3 + length
    return None


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readexactly(16)
        if head[:12] != SIGNATURE:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\nno PROXY header\n")
            return
        family, length = head[13], struct.unpack("!H", head[14:16])[0]
        caller = spiffe_id_from_proxy_header(await reader.readexactly(length), family)
        await reader.readuntil(b"\r\n\r\n")
        body = f"hello {caller}, this is the api service\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_api(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def call_web(url: str, interval: float) -> None:
    count = 0
    while True:
        count += 1
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback demo
                print(f"ok {count} {answer.read().decode().strip()}", flush=True)
        except OSError as exc:
            print(f"fail {count} {exc}", flush=True)
        time.sleep(interval)


def main() -> None:
    role = sys.argv[1]
    try:
        if role == "api":
            asyncio.run(serve_api(int(sys.argv[2])))
        elif role == "web":
            call_web(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.5)
        else:
            raise SystemExit(f"unknown role {role}: use api or web")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
