"""Load clients, each run in its own process so the load never shares a GIL with the
orchestrator or the sink:

    python -m bench.dataplane.load bulk HOST PORT BYTES        -> {"seconds": s}
    python -m bench.dataplane.load pingpong HOST PORT COUNT    -> {"rtts_us": [...]}
    python -m bench.dataplane.load connect HOST PORT CONCURRENCY SECONDS
                                                -> {"connections": n, "errors": e, "seconds": s}
    python -m bench.dataplane.load idle HOST PORT COUNT        -> prints {"open": n, "errors": e},
                                                                  holds them until stdin closes

Every mode checks the bytes that come back, so a proxy that corrupts or drops data fails the
bench instead of looking fast."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import time

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False

CHUNK = 1 << 20


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bulk(host: str, port: int, total: int) -> dict[str, float]:
    """Send `total` bytes on one connection, half-close, wait for the sink's byte count."""
    payload = memoryview(bytes(range(256)) * (CHUNK // 256))
    with _connect(host, port) as sock:
        start = time.perf_counter()
        sock.sendall(b"B")
        left = total
        while left > 0:
            n = min(left, CHUNK)
            sock.sendall(payload[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 8:
            got = sock.recv(8 - len(answer))
            if not got:
                raise RuntimeError(f"connection closed after {len(answer)} bytes of the count")
            answer += got
        seconds = time.perf_counter() - start
    counted = int.from_bytes(answer, "big")
    if counted != total:
        raise RuntimeError(f"sink counted {counted} bytes, sent {total}")
    return {"seconds": seconds}


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise RuntimeError("connection closed mid-message")
        buf += got
    return bytes(buf)


def pingpong(host: str, port: int, count: int, size: int = 100) -> dict[str, list[float]]:
    """`count` round trips of `size`-byte messages on one connection (after a warm-up)."""
    message = bytes(i % 251 for i in range(size))
    rtts = []
    with _connect(host, port) as sock:
        sock.sendall(b"E")
        for i in range(count + 200):
            start = time.perf_counter()
            sock.sendall(message)
            if _recv_exactly(sock, size) != message:
                raise RuntimeError("echo returned different bytes")
            if i >= 200:
                rtts.append((time.perf_counter() - start) * 1e6)
    return {"rtts_us": rtts}


async def _one_connection(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"Ex")
        if await reader.readexactly(1) != b"x":
            raise RuntimeError("echo returned a different byte")
    finally:
        writer.close()
        await writer.wait_closed()


async def connect(host: str, port: int, concurrency: int, seconds: float) -> dict[str, float]:
    """New connections per second: each completes a round trip through the whole path."""
    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            try:
                await asyncio.wait_for(_one_connection(host, port), 10)
                done += 1
            except (OSError, RuntimeError, asyncio.IncompleteReadError, TimeoutError):
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"connections": done, "errors": errors, "seconds": time.perf_counter() - start}


async def idle(host: str, port: int, count: int) -> None:
    """Open `count` connections (each proven end to end by one echoed byte), report, and
    hold them until stdin closes."""
    writers = []
    errors = 0
    sem = asyncio.Semaphore(64)

    async def open_one() -> None:
        nonlocal errors
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                writer.write(b"Ex")
                await asyncio.wait_for(reader.readexactly(1), 30)
                writers.append(writer)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                errors += 1

    await asyncio.gather(*(open_one() for _ in range(count)))
    print(json.dumps({"open": len(writers), "errors": errors}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.close()


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    _raise_fd_limit()
    mode, host, port, *rest = sys.argv[1:]
    run = uvloop.run if HAVE_UVLOOP else asyncio.run
    if mode == "bulk":
        result: object = bulk(host, int(port), int(rest[0]))
    elif mode == "pingpong":
        result = pingpong(host, int(port), int(rest[0]))
    elif mode == "connect":
        result = run(connect(host, int(port), int(rest[0]), float(rest[1])))
    elif mode == "idle":
        run(idle(host, int(port), int(rest[0])))
        return
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
