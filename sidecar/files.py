"""Writes identities to disk for applications that read certificates from files.

For each `files:` entry of the config, whenever its identity or the trust bundle changes:
`svid.pem` (leaf + intermediates, 0644), `svid_key.pem` (PKCS#8, 0600) and `bundle.pem`
(the trust bundle roots, 0644) are each written atomically (temporary file, fsync, rename),
then the optional reload command runs without a shell, with a timeout. A failed write or
command is logged and counted and never stops the sidecar; it is retried on the next change.

The key is written before the certificate, so that an application that reads both between
the two renames may see a new key with the old certificate for an instant; the reload
command, run after all three files are in place, is what tells it to load a consistent
pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtls.identity.pem import write_atomic
from sidecar.config import FileSink
from sidecar.identity.model import Snapshot, WorkloadIdentity
from sidecar.identity.publisher import Subscription
from sidecar.metrics import SidecarMetrics

log = logging.getLogger(__name__)

SVID_FILE = "svid.pem"
KEY_FILE = "svid_key.pem"
BUNDLE_FILE = "bundle.pem"
_OUTPUT_LIMIT = 2000


@dataclass(frozen=True)
class _Written:
    serial: str
    bundle_version: int
    bundle_fingerprints: tuple[str, ...]


async def _finish_even_if_cancelled(work: Coroutine[Any, Any, None]) -> None:
    """Await `work`; if the caller is cancelled meanwhile, let `work` finish first, then
    re-raise. A write runs on a thread, which cancellation cannot interrupt: without this a
    stopped sidecar could still rename files into place after `stop()` returned."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


class FileWriter:
    """Keeps each configured directory in step with the published snapshots."""

    def __init__(self, sinks: tuple[FileSink, ...], metrics: SidecarMetrics | None = None) -> None:
        self._sinks = sinks
        self._metrics = metrics
        self._written: dict[Path, _Written] = {}
        self._missing_warned: set[Path] = set()
        self.reloads = 0
        self.failures = 0

    async def run(self, subscription: Subscription) -> None:
        """Apply every snapshot from `subscription` until cancelled."""
        async with subscription:
            async for snapshot in subscription:
                await self.apply(snapshot)

    async def apply(self, snapshot: Snapshot) -> None:
        if snapshot.bundle is None:
            return
        for sink in self._sinks:
            ident = snapshot.by_spiffe_id(sink.spiffe_id)
            if ident is None:
                if sink.dir not in self._missing_warned and snapshot.node is not None:
                    self._missing_warned.add(sink.dir)
                    log.warning(
                        "no identity for a files entry yet; is it registered for this node?",
                        extra={"spiffe_id": str(sink.spiffe_id), "dir": str(sink.dir)},
                    )
                continue
            self._missing_warned.discard(sink.dir)
            bundle = snapshot.bundle
            mark = _Written(ident.svid.serial, bundle.version, bundle.fingerprints())
            if self._written.get(sink.dir) == mark:
                continue
            if await self._write(sink, ident, bundle.pem()):
                self._written[sink.dir] = mark
                await self._reload(sink)

    def _fail(self, sink: FileSink, reason: str) -> None:
        self.failures += 1
        if self._metrics is not None:
            self._metrics.reload_failures.labels(spiffe_id=str(sink.spiffe_id), reason=reason).inc()

    async def _write(self, sink: FileSink, ident: WorkloadIdentity, bundle_pem: bytes) -> bool:
        files = (
            (KEY_FILE, ident.svid.key_pem(), 0o600),
            (SVID_FILE, ident.svid.chain_pem(), 0o644),
            (BUNDLE_FILE, bundle_pem, 0o644),
        )
        try:
            await _finish_even_if_cancelled(asyncio.to_thread(_write_all, sink.dir, files))
        except OSError as exc:
            self._fail(sink, "write")
            log.error(
                "cannot write identity files",
                extra={"dir": str(sink.dir), "spiffe_id": str(sink.spiffe_id), "error": str(exc)},
            )
            return False
        if self._metrics is not None:
            self._metrics.file_writes.labels(spiffe_id=str(sink.spiffe_id)).inc()
        log.info(
            "identity files written",
            extra={
                "dir": str(sink.dir),
                "spiffe_id": str(sink.spiffe_id),
                "serial": ident.svid.serial,
            },
        )
        return True

    async def _reload(self, sink: FileSink) -> None:
        if not sink.reload_command:
            return
        extra = {"dir": str(sink.dir), "command": list(sink.reload_command)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *sink.reload_command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            self._fail(sink, "start")
            log.error("cannot start the reload command", extra={**extra, "error": str(exc)})
            return
        try:
            async with asyncio.timeout(sink.reload_timeout_seconds):
                output, _ = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            self._fail(sink, "timeout")
            log.error(
                "reload command timed out and was killed",
                extra={**extra, "timeout_seconds": sink.reload_timeout_seconds},
            )
            return
        text = output.decode(errors="replace")[-_OUTPUT_LIMIT:].strip()
        if proc.returncode != 0:
            self._fail(sink, "exit_status")
            log.error(
                "reload command failed",
                extra={**extra, "exit_status": proc.returncode, "output": text},
            )
            return
        self.reloads += 1
        log.info("reload command succeeded", extra={**extra, "output": text})


def _write_all(directory: Path, files: tuple[tuple[str, bytes, int], ...]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data, mode in files:
        write_atomic(directory / name, data, mode=mode)
