"""Prometheus metrics of one sidecar, in a registry of its own (never the global one, so
two sidecars in one process, as in the tests, do not collide).

Counters are incremented where things happen; the gauges that depend on time (seconds to
expiry) are computed at scrape time from the manager's snapshot and the injected clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from meshtls.clock import Clock
from sidecar.identity.model import Snapshot


class StateSource(Protocol):
    def snapshot(self) -> Snapshot: ...

    def ca_reachable(self) -> bool | None: ...

    def readiness(self) -> tuple[bool, str]: ...


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.renewals = Counter(
            "meshtls_sidecar_renewals",
            "Certificates obtained from the CA, by kind (node or workload)",
            ["kind"],
            registry=self.registry,
        )
        self.renewal_failures = Counter(
            "meshtls_sidecar_renewal_failures",
            "Failed attempts to obtain or refresh identities, by operation and reason",
            ["operation", "reason"],
            registry=self.registry,
        )
        self.file_writes = Counter(
            "meshtls_sidecar_file_writes",
            "Identity files written to disk, by SPIFFE ID",
            ["spiffe_id"],
            registry=self.registry,
        )
        self.reload_failures = Counter(
            "meshtls_sidecar_reload_failures",
            "Failed file writes or reload commands, by SPIFFE ID and reason",
            ["spiffe_id", "reason"],
            registry=self.registry,
        )

    def watch_state(self, source: StateSource, clock: Clock) -> None:
        """Export time-dependent gauges computed from `source` at each scrape."""
        self.registry.register(_StateCollector(source, clock))


class _StateCollector:
    def __init__(self, source: StateSource, clock: Clock) -> None:
        self._source = source
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        now = self._clock.now()
        snap = self._source.snapshot()
        expiry = GaugeMetricFamily(
            "meshtls_sidecar_certificate_expiry_seconds",
            "Seconds until the certificate held for an identity expires (negative: expired)",
            labels=["spiffe_id", "kind"],
        )
        if snap.node is not None:
            node = snap.node.svid
            expiry.add_metric([str(node.spiffe_id), "node"], node.not_after - now)
        for ident in snap.identities.values():
            expiry.add_metric([str(ident.entry.spiffe_id), "workload"], ident.svid.not_after - now)
        yield expiry
        reachable = self._source.ca_reachable()
        yield GaugeMetricFamily(
            "meshtls_sidecar_ca_reachable",
            "1 when the last call reached the CA, 0 when it did not (-1: not tried yet)",
            value=-1 if reachable is None else int(reachable),
        )
        ready, _ = self._source.readiness()
        yield GaugeMetricFamily(
            "meshtls_sidecar_ready", "1 when the node and every identity are held", value=int(ready)
        )
        if snap.bundle is not None:
            yield GaugeMetricFamily(
                "meshtls_sidecar_trust_bundle_version",
                "Version of the trust bundle in use",
                value=snap.bundle.version,
            )
