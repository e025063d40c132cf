"""Builds the SDS socket server from the `sds:` config block."""

from __future__ import annotations

from meshtls.clock import Clock
from sidecar.sds.service import SdsService
from sidecar.workload_api.attestation import Policy
from sidecar.workload_api.calls import SnapshotSource
from sidecar.workload_api.server import LocalApiServer
from sidecar.workload_api.settings import SocketApiConfig


def sds_server(config: SocketApiConfig, source: SnapshotSource, clock: Clock) -> LocalApiServer:
    policy = Policy(allow_entries_without_selectors=config.allow_entries_without_selectors)
    return LocalApiServer(config.socket, SdsService(source, policy, clock), name="Envoy SDS")
