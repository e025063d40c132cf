"""`meshtls-ca serve --workers N`: N-1 extra serving processes on the same ports.

One Python process signs on one core (the GIL). Workers are full CA replicas of the first
process on the same database (rotation and pruning take a lease; revocations and
authorities are picked up by each replica's trust poll), sharing the gRPC listeners with
SO_REUSEPORT so the kernel spreads connections over them. They start after the first
process has migrated and bootstrapped the database, run the same command line plus a
hidden `--worker` flag, and stop with it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

log = logging.getLogger(__name__)


def _worker_argv() -> list[str]:
    argv = list(sys.argv[1:])
    cleaned: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        cleaned.append(arg)
    return [sys.executable, "-m", "ca_server", *cleaned, "--worker"]


class WorkerPool:
    def __init__(self, count: int) -> None:
        self._count = count
        self._processes: list[asyncio.subprocess.Process] = []
        self._starter: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._count > 0:
            self._starter = asyncio.create_task(self._start_all(), name="ca-workers")

    async def _start_all(self) -> None:
        argv = _worker_argv()
        for index in range(self._count):
            process = await asyncio.create_subprocess_exec(*argv)
            self._processes.append(process)
            log.info("CA worker started", extra={"worker": index + 1, "pid": process.pid})

    async def stop(self) -> None:
        if self._starter is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._starter
        for process in self._processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        self._processes = []
