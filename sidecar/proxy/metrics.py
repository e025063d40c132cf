"""Prometheus metrics of the proxy, registered on the sidecar's own registry.

Counters are bumped once per connection or handshake, never per read: the byte counts
and the active-connection gauge are computed at scrape time from the listeners (bytes of
closed connections plus the live counters of open ones), so the data path pays nothing.

* `meshtls_proxy_handshakes_total{listener,result}`: accepted, refused, audited (denied
  but let through by `audit: true`);
* `meshtls_proxy_resumed_handshakes_total{listener}`: accepted ones that resumed a session;
* `meshtls_proxy_refused_total{listener,reason}`: every refused connection by reason;
* `meshtls_proxy_audit_denied_total{listener,reason}`: denials let through in audit mode;
* `meshtls_proxy_connections_total{listener,result}`: closed connections by result;
* `meshtls_proxy_active_connections{listener}`;
* `meshtls_proxy_bytes_total{listener,direction}`: plaintext bytes, `upstream` (from the
  connecting side onward) and `downstream` (back to it);
* `meshtls_proxy_pooled_connections{listener}`: ready pre-established upstream connections;
* `meshtls_proxy_direct_tls_connections_total{listener}`: closed connections whose TLS
  data went through OpenSSL's own socket I/O (bulk connections, see `native_io.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


@dataclass(frozen=True)
class ListenerStats:
    """What one listener holds right now (its open connections only)."""

    name: str
    active: int
    bytes_upstream: int  # of open connections so far
    bytes_downstream: int
    pooled: int


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.handshakes = Counter(
            "meshtls_proxy_handshakes",
            "TLS handshakes by result (accepted, refused, audited)",
            ["listener", "result"],
            registry=self.registry,
        )
        self.resumed = Counter(
            "meshtls_proxy_resumed_handshakes",
            "Accepted TLS handshakes that resumed an earlier session",
            ["listener"],
            registry=self.registry,
        )
        self.refused = Counter(
            "meshtls_proxy_refused",
            "Connections refused, by reason",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.audit_denied = Counter(
            "meshtls_proxy_audit_denied",
            "Peers denied by policy but let through because the listener is in audit mode",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.connections = Counter(
            "meshtls_proxy_connections",
            "Closed connections, by result",
            ["listener", "result"],
            registry=self.registry,
        )
        self.direct_tls = Counter(
            "meshtls_proxy_direct_tls_connections",
            "Closed connections whose TLS side OpenSSL ran on the socket itself (bulk data)",
            ["listener"],
            registry=self.registry,
        )
        self._counters: dict[str, ListenerCounters] = {}
        self._sources: list[Callable[[], Iterable[ListenerStats]]] = []
        # Bytes of closed connections by listener name (kept when a listener goes away).
        self.closed_bytes: dict[str, list[int]] = {}
        self.registry.register(_LiveCollector(self))

    def connection_closed(self, listener: str, result: str, upstream: int, downstream: int) -> None:
        self.counters(listener).closed(result, upstream, downstream)

    def counters(self, listener: str) -> ListenerCounters:
        """The counters of one listener (by name), looked up once."""
        counters = self._counters.get(listener)
        if counters is None:
            counters = self._counters[listener] = ListenerCounters(self, listener)
        return counters

    def watch(self, source: Callable[[], Iterable[ListenerStats]]) -> None:
        """Export gauges and byte counters computed from `source` at each scrape."""
        self._sources.append(source)

    def stats(self) -> Iterator[ListenerStats]:
        for source in self._sources:
            yield from source()


class ListenerCounters:
    """One listener's labelled counters, kept: `labels()` takes a lock and builds a key at
    every call, which adds up at thousands of connections per second."""

    def __init__(self, metrics: ProxyMetrics, listener: str) -> None:
        self._metrics = metrics
        self._listener = listener
        self._handshakes: dict[str, Counter] = {}
        self._refused: dict[str, Counter] = {}
        self._closed: dict[str, Counter] = {}
        self.resumed = metrics.resumed.labels(listener)
        self.direct_tls = metrics.direct_tls.labels(listener)
        self.bytes = metrics.closed_bytes.setdefault(listener, [0, 0])

    def handshake(self, result: str, resumed: bool) -> None:
        child = self._handshakes.get(result)
        if child is None:
            child = self._handshakes[result] = self._metrics.handshakes.labels(
                self._listener, result
            )
        child.inc()
        if resumed:
            self.resumed.inc()

    def refused(self, reason: str) -> None:
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self._metrics.refused.labels(self._listener, reason)
        child.inc()

    def closed(self, result: str, upstream: int, downstream: int) -> None:
        child = self._closed.get(result)
        if child is None:
            child = self._closed[result] = self._metrics.connections.labels(self._listener, result)
        child.inc()
        totals = self.bytes
        totals[0] += upstream
        totals[1] += downstream


class _LiveCollector:
    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "meshtls_proxy_active_connections", "Open connections", labels=["listener"]
        )
        pooled = GaugeMetricFamily(
            "meshtls_proxy_pooled_connections",
            "Pre-established upstream connections ready for use",
            labels=["listener"],
        )
        moved = CounterMetricFamily(
            "meshtls_proxy_bytes",
            "Plaintext bytes relayed: upstream (from the connecting side onward), downstream",
            labels=["listener", "direction"],
        )
        live: dict[str, list[int]] = {}
        for stats in self._metrics.stats():
            row = live.setdefault(stats.name, [0, 0, 0, 0])
            row[0] += stats.active
            row[1] += stats.pooled
            row[2] += stats.bytes_upstream
            row[3] += stats.bytes_downstream
        for name, (n_active, n_pooled, _, _) in sorted(live.items()):
            active.add_metric([name], n_active)
            pooled.add_metric([name], n_pooled)
        for name in sorted(set(live) | set(self._metrics.closed_bytes)):
            up, down = self._metrics.closed_bytes.get(name, [0, 0])
            row = live.get(name, [0, 0, 0, 0])
            moved.add_metric([name, "upstream"], up + row[2])
            moved.add_metric([name, "downstream"], down + row[3])
        yield active
        yield pooled
        yield moved
