"""Helpers for the Workload API, SDS and fetch tests: the environment (a REAL CA from
tests/support/ca.py, a join token, a short socket directory), a real SidecarApp on a
ManualClock (advanced to reach renewal points; the CA and every TLS stack stay on real
time)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtls.clock import ManualClock
from sidecar.app import SidecarApp
from sidecar.config import SidecarConfig
from tests.sidecar.helpers import config_from, sidecar_document
from tests.support.ca import RunningCA

NODE = "web-1"
TTL = 600


@dataclass
class Env:
    tmp_path: Path
    ca: RunningCA
    bundle_path: Path
    token_file: Path
    socket_dir: Path

    @property
    def workload_socket(self) -> Path:
        return self.socket_dir / "workload.sock"

    @property
    def sds_socket(self) -> Path:
        return self.socket_dir / "sds.sock"

    async def entry(self, spiffe_id: str, *selectors: str, ttl: int = TTL) -> str:
        return await self.ca.create_entry(spiffe_id, NODE, ttl_seconds=ttl, selectors=selectors)

    def document(self, **extra: Any) -> dict[str, Any]:
        doc = sidecar_document(
            self.tmp_path,
            agent_address=self.ca.agent_address,
            enroll_address=self.ca.enroll_address,
            bundle_path=self.bundle_path,
            token_file=self.token_file,
            node=NODE,
        )
        doc["workload_api"] = {"socket": str(self.workload_socket)}
        doc["sds"] = {"socket": str(self.sds_socket)}
        doc.update(extra)
        return doc

    def config(self, **extra: Any) -> SidecarConfig:
        return config_from(self.tmp_path, self.document(**extra))


@asynccontextmanager
async def sidecar(config: SidecarConfig, clock: ManualClock) -> AsyncIterator[SidecarApp]:
    app = SidecarApp(config, clock=clock)
    await app.start()
    try:
        yield app
        for task in app._tasks:
            if task.done() and not task.cancelled():
                raise AssertionError(f"task {task.get_name()} died") from task.exception()
    finally:
        await app.stop()


def serial_of(app: SidecarApp, spiffe_id: str) -> str | None:
    for ident in app.manager.snapshot().identities.values():
        if str(ident.entry.spiffe_id) == spiffe_id:
            return ident.svid.serial
    return None


def me() -> str:
    """The selector that matches this test process."""
    return f"unix:uid:{os.getuid()}"
