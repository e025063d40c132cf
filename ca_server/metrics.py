"""Prometheus metrics of one CA process, in its own registry (so several CAs can live in one
test process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class CAMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.issued = Counter(
            "meshtls_ca_certificates_issued",
            "Certificates issued and committed, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.failures = Counter(
            "meshtls_ca_request_failures",
            "Requests refused or failed, by method and gRPC status",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "meshtls_ca_request_seconds",
            "Request latency by method",
            ["method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.watchers = Gauge(
            "meshtls_ca_watch_streams",
            "Open Watch streams (connected sidecars)",
            registry=self.registry,
        )
        self.revoked = Gauge(
            "meshtls_ca_revocation_list_size",
            "Unexpired revoked certificates",
            registry=self.registry,
        )

        self.job_runs = Counter(
            "meshtls_ca_job_runs", "Scheduled job runs", ["job"], registry=self.registry
        )
        self.job_failures = Counter(
            "meshtls_ca_job_failures",
            "Scheduled job runs that failed",
            ["job"],
            registry=self.registry,
        )

    def expiry_gauge(self, collect: Callable[[], list[tuple[str, str, str, float]]]) -> None:
        """Register seconds-to-expiry of every authority: collect() -> (id, kind, state, secs)."""
        self.registry.register(_AuthorityExpiry(collect))


class _AuthorityExpiry(Collector):
    def __init__(self, collect: Callable[[], list[tuple[str, str, str, float]]]) -> None:
        self._collect = collect

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily(
            "meshtls_ca_authority_expiry_seconds",
            "Seconds until each CA certificate (root, intermediate, upstream) expires",
            labels=["authority", "kind", "state"],
        )
        for authority_id, kind, state, seconds in self._collect():
            family.add_metric([authority_id, kind, state], seconds)
        yield family
