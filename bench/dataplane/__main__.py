"""Run the data-plane bench and print one table (medians of `--runs`, ratios to Envoy).

.venv/bin/python -m bench.dataplane [--runs 3] [--bulk-mib 1024] [--only NAME ...]
    [--meshtls-access-log]

Besides the table, a second one gives each proxy's CPU time per new connection and how
many of the meshtls client proxy's TLS handshakes resumed a session.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.dataplane.pki import make_pki
from bench.dataplane.processes import cpu_seconds, free_port, rss_bytes, start, stop, wait_listening
from bench.dataplane.topologies import Direct, Envoy, Stunnel, Topology

LOAD = [sys.executable, "-m", "bench.dataplane.load"]
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Figures:
    mb_per_s: list[float] = field(default_factory=list)
    cpu_s_per_gib: list[float] = field(default_factory=list)
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    conns_per_s: list[float] = field(default_factory=list)
    conn_cpu_ms: list[float] = field(default_factory=list)  # per connection, per proxy
    conn_errors: int = 0
    handshakes: tuple[int, int] | None = None  # (accepted, resumed) by the client proxy
    idle_open: int = 0
    idle_rss_mib: float = 0.0
    idle_errors: int = 0
    notes: list[str] = field(default_factory=list)


def _load(*args: str, timeout: float = 600) -> dict[str, object]:
    out = subprocess.run(
        [*LOAD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"load {args[0]} failed: {out.stderr.strip()[-500:]}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(topo: Topology, args: argparse.Namespace, progress: Callable[[str], None]) -> Figures:
    figures = Figures()
    port = str(topo.entry_port)
    size = args.bulk_mib << 20
    for run in range(args.runs):
        progress(f"{topo.name}: run {run + 1}/{args.runs}: bulk {args.bulk_mib} MiB")
        before = cpu_seconds(topo.proxy_pids)
        bulk = _load("bulk", "127.0.0.1", port, str(size))
        used = cpu_seconds(topo.proxy_pids) - before
        seconds = float(bulk["seconds"])  # type: ignore[arg-type]
        figures.mb_per_s.append(size / seconds / 1e6)
        figures.cpu_s_per_gib.append(used / (size / (1 << 30)))
        progress(f"{topo.name}: run {run + 1}/{args.runs}: ping-pong")
        rtts: list[float] = _load("pingpong", "127.0.0.1", port, str(args.pings))["rtts_us"]  # type: ignore[assignment]
        figures.p50_us.append(_pct(rtts, 0.50))
        figures.p99_us.append(_pct(rtts, 0.99))
        progress(f"{topo.name}: run {run + 1}/{args.runs}: new connections")
        before = cpu_seconds(topo.proxy_pids)
        conn = _load("connect", "127.0.0.1", port, str(args.concurrency), str(args.conn_seconds))
        used = cpu_seconds(topo.proxy_pids) - before
        done = float(conn["connections"])  # type: ignore[arg-type]
        figures.conns_per_s.append(done / float(conn["seconds"]))  # type: ignore[arg-type]
        if done and topo.proxy_pids:
            figures.conn_cpu_ms.append(used * 1000 / done / len(topo.proxy_pids))
        figures.conn_errors += int(conn["errors"])  # type: ignore[call-overload]
    handshakes = getattr(topo, "handshakes", None)
    if handshakes is not None:
        figures.handshakes = handshakes()
    if args.idle:
        progress(f"{topo.name}: {args.idle} idle connections")
        holder = subprocess.Popen(
            [*LOAD, "idle", "127.0.0.1", port, str(args.idle)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert holder.stdout is not None
        assert holder.stdin is not None
        line = holder.stdout.readline()
        try:
            opened = json.loads(line)
            figures.idle_open = int(opened["open"])
            figures.idle_errors = int(opened["errors"])
            time.sleep(1)  # let the proxies settle: memory, not a test assertion
            figures.idle_rss_mib = rss_bytes(topo.proxy_pids) / (1 << 20)
        finally:
            holder.stdin.close()
            holder.wait(timeout=120)
    return figures


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def table(results: dict[str, tuple[str, Figures]], idle: int) -> str:
    envoy = results.get("envoy")
    med = statistics.median

    def ratio(name: str, get: Callable[[Figures], float], higher_better: bool = True) -> str:
        if envoy is None or name == "envoy":
            return ""
        base = get(envoy[1])
        value = get(results[name][1])
        if not base or not value:
            return ""
        return f" ({value / base:.2f}x)"

    rows = [
        "| topology | version | bulk MB/s | ping-pong p50 us | p99 us | new conn/s (32) "
        f"| proxy CPU s/GiB | RSS MiB, {idle:,} idle conns |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (version, f) in results.items():

        def bulk(x: Figures) -> float:
            return med(x.mb_per_s)

        def p50(x: Figures) -> float:
            return med(x.p50_us)

        def p99(x: Figures) -> float:
            return med(x.p99_us)

        def conns(x: Figures) -> float:
            return med(x.conns_per_s)

        def cpu(x: Figures) -> float:
            return med(x.cpu_s_per_gib)

        idle_text = "" if name == "direct" else _fmt(f.idle_rss_mib, 1)
        if f.idle_open and f.idle_open < idle:
            idle_text += f" (only {f.idle_open:,} opened)"
        rows.append(
            f"| {name} | {version} | {_fmt(bulk(f))}{ratio(name, bulk)} "
            f"| {_fmt(p50(f))}{ratio(name, p50)} | {_fmt(p99(f))}{ratio(name, p99)} "
            f"| {_fmt(conns(f))}{ratio(name, conns)}"
            + (f", {f.conn_errors} errors" if f.conn_errors else "")
            + f" | {'' if name == 'direct' else _fmt(cpu(f), 2)} | {idle_text} |"
        )
    return "\n".join(rows)


def details(results: dict[str, tuple[str, Figures]], access_log: bool) -> str:
    """A second table (the first keeps its format): the steadier per-unit CPU figures and,
    for meshtls, how many of the client proxy's handshakes resumed a session."""
    med = statistics.median
    rows = [
        "| topology | proxy CPU ms per new connection (each proxy) | handshakes resumed |",
        "|---|---|---|",
    ]
    for name, (_, f) in results.items():
        if name == "direct":
            continue
        cpu = _fmt(med(f.conn_cpu_ms), 2) if f.conn_cpu_ms else ""
        resumed = ""
        if f.handshakes is not None:
            accepted, done = f.handshakes
            resumed = f"{done:,} of {accepted:,}" + (
                f" ({100 * done / accepted:.1f}%)" if accepted else ""
            )
        rows.append(f"| {name} | {cpu} | {resumed} |")
    rows.append("")
    log = "with" if access_log else "without"
    rows.append(
        f"meshtls sidecars ran {log} their access log "
        f"(--log-level {'info' if access_log else 'warning'}); Envoy has none configured."
    )
    return "\n".join(rows)


def _raise_fd_limit(want: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def topologies(only: list[str], access_log: bool) -> list[Topology]:
    from bench.dataplane.meshtls_topology import Meshtls

    every: list[Topology] = [Direct(), Envoy(), Stunnel(), Meshtls(access_log=access_log)]
    return [t for t in every if not only or t.name in only]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bulk-mib", type=int, default=1024)
    parser.add_argument("--pings", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--conn-seconds", type=float, default=5.0)
    # 9,900, not 10,000: where the hard limit on open files is 20,000 per process (these
    # sandboxes), a client-side proxy holding two sockets per connection cannot reach 10,000.
    parser.add_argument("--idle", type=int, default=9_900, help="0 skips the idle test")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument(
        "--meshtls-access-log",
        action="store_true",
        help="run the sidecars at --log-level info, with one access-log line per connection",
    )
    args = parser.parse_args()
    _raise_fd_limit(200_000)

    def progress(text: str) -> None:
        print(f"... {text}", file=sys.stderr, flush=True)

    results: dict[str, tuple[str, Figures]] = {}
    with tempfile.TemporaryDirectory(prefix="meshtls-dataplane-") as tmp:
        workdir = Path(tmp)
        pki = make_pki(workdir)
        sink_port = free_port()
        sink = start(
            [sys.executable, "-m", "bench.dataplane.sink", str(sink_port)], workdir / "sink.log"
        )
        try:
            wait_listening(sink_port, [sink])
            for topo in topologies(args.only, args.meshtls_access_log):
                progress(f"starting {topo.name}")
                topo_dir = workdir / topo.name
                topo_dir.mkdir()
                topo.start(topo_dir, sink_port, pki)
                try:
                    results[topo.name] = (topo.version(), measure(topo, args, progress))
                finally:
                    topo.stop()
        finally:
            stop(sink)
    print(table(results, args.idle))
    print()
    print(details(results, args.meshtls_access_log))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
