"""Composition root: builds the CA client, state store, identity manager, trust watcher,
file writer and status server from a validated config, and runs them together.

Start order: the state directory is loaded first (so persisted identities are served at
once, even with the CA down), then the status server listens, then the background tasks
start. Stop order is the reverse. If a background task dies of a bug, `run_until` raises
so that the process exits and its supervisor restarts it with the persisted state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from meshtls.clock import Clock, SystemClock
from meshtls.statushttp import StatusServer
from sidecar.config import SidecarConfig
from sidecar.files import FileWriter
from sidecar.identity.ca_client import CAClient
from sidecar.identity.manager import IdentityManager
from sidecar.identity.state import StateStore
from sidecar.identity.watch import watch_trust
from sidecar.metrics import SidecarMetrics
from sidecar.proxy.config import ProxyConfig
from sidecar.proxy.metrics import ProxyMetrics
from sidecar.proxy.reload import reload_proxy
from sidecar.proxy.service import ProxyService
from sidecar.sds.server import sds_server
from sidecar.status import routes
from sidecar.workload_api.server import LocalApiServer, workload_api_server

log = logging.getLogger(__name__)


class SidecarApp:
    """One sidecar. Create it inside the running event loop."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.metrics = SidecarMetrics()
        self.client = CAClient(config.ca)
        self.store = StateStore(config.state_dir, config.trust_domain, config.node)
        self.manager = IdentityManager(
            config,
            clock=self.clock,
            client=self.client,
            store=self.store,
            metrics=self.metrics,
            rng=rng,
        )
        self.metrics.watch_state(self.manager, self.clock)
        self.files = FileWriter(config.files, self.metrics)
        listen = config.status.listen
        self.status = StatusServer(
            routes(self.manager, self.clock, self.metrics), host=listen.host, port=listen.port
        )
        self._tasks: list[asyncio.Task[None]] = []
        # Local socket APIs for workloads and Envoy; None unless configured.
        self.workload_api: LocalApiServer | None = None
        if config.workload_api is not None:
            self.workload_api = workload_api_server(config.workload_api, self.manager, self.clock)
        self.sds: LocalApiServer | None = None
        if config.sds is not None:
            self.sds = sds_server(config.sds, self.manager, self.clock)
        # The mutual-TLS proxy (sidecar/proxy/): idle without inbound/outbound listeners.
        self.proxy = ProxyService(
            ProxyConfig(config.inbound, config.outbound),
            metrics=ProxyMetrics(self.metrics.registry),
        )
        self._reloads: set[asyncio.Task[bool]] = set()

    async def start(self) -> None:
        await self.manager.start()
        await self.status.start()
        await self._start_local_apis()
        await self._start_proxy()
        self._tasks = [
            asyncio.create_task(self.manager.run(), name="identity-manager"),
            asyncio.create_task(
                watch_trust(self.manager, self.client, self.clock), name="trust-watch"
            ),
            asyncio.create_task(self.files.run(self.manager.subscribe()), name="file-writer"),
        ]
        log.info(
            "sidecar started",
            extra={
                "node": self.config.node,
                "trust_domain": self.config.trust_domain,
                "ca": str(self.config.ca.address),
                "status_url": self.status.url,
            },
        )

    def _local_apis(self) -> list[LocalApiServer]:
        return [api for api in (self.workload_api, self.sds) if api is not None]

    async def _start_local_apis(self) -> None:
        started: list[LocalApiServer] = []
        try:
            for api in self._local_apis():
                await api.start()
                started.append(api)
        except BaseException:
            for api in reversed(started):
                await api.stop()
            await self.status.stop()
            raise

    async def _start_proxy(self) -> None:
        try:
            await self.proxy.start(self.manager)
        except BaseException:
            for api in reversed(self._local_apis()):
                await api.stop()
            await self.status.stop()
            raise

    def request_reload(self) -> None:
        """SIGHUP: retry the CA at once and re-read the proxy listeners from the file."""
        self.manager.wake()
        task = asyncio.create_task(reload_proxy(self.config, self.proxy), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def stop(self) -> None:
        await self.proxy.drain()  # stop accepting, let open connections finish
        for api in reversed(self._local_apis()):
            await api.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.status.stop()
        await self.client.close()
        log.info("sidecar stopped", extra={"node": self.config.node})

    async def __aenter__(self) -> SidecarApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run_until(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; re-raise if a background task fails."""
        async with self:
            stopper = asyncio.create_task(stop.wait(), name="stop-signal")
            pending: set[asyncio.Task[object]] = {stopper, *self._tasks}
            try:
                while stopper in pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if task is stopper or task.cancelled():
                            continue
                        error = task.exception()
                        if error is not None:
                            log.critical(
                                "background task failed; stopping",
                                extra={"task": task.get_name()},
                                exc_info=error,
                            )
                            raise RuntimeError(
                                f"background task {task.get_name()} failed: {error}"
                            ) from error
            finally:
                stopper.cancel()
