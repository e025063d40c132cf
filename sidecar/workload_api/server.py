"""The two local socket APIs as the sidecar starts and stops them.

`LocalApiServer` pairs one service with its Unix socket: `stop()` first ends the service's
open streams with UNAVAILABLE (clients retry), then closes the socket and its connections.
`workload_api_server` and (in `sidecar.sds`) `sds_server` build one from the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from grpclib.const import Handler

from meshtls.clock import Clock
from sidecar.workload_api.attestation import Policy
from sidecar.workload_api.calls import CallTracker, SnapshotSource
from sidecar.workload_api.service import WorkloadApiService
from sidecar.workload_api.settings import SocketApiConfig
from sidecar.workload_api.unixgrpc import UnixGrpcServer


class TrackedService(Protocol):
    tracker: CallTracker

    def __mapping__(self) -> Mapping[str, Handler]: ...


class LocalApiServer:
    def __init__(self, path: Path, service: TrackedService, *, name: str) -> None:
        self.service = service
        self.grpc = UnixGrpcServer(path, [service], name=name)

    @property
    def path(self) -> Path:
        return self.grpc.path

    async def start(self) -> None:
        await self.grpc.start()

    async def stop(self) -> None:
        await self.service.tracker.shutdown()
        await self.grpc.stop()


def workload_api_server(
    config: SocketApiConfig, source: SnapshotSource, clock: Clock
) -> LocalApiServer:
    policy = Policy(allow_entries_without_selectors=config.allow_entries_without_selectors)
    service = WorkloadApiService(source, policy, clock)
    return LocalApiServer(config.socket, service, name="SPIFFE Workload API")
