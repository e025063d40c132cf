"""Durable issuances per second over the full path: gRPC (mTLS) + CSR verify + sign +
database commit, with `concurrency` clients (each its own enrolled node), on SQLite and on
PostgreSQL; and, in the same run, the raw rate of building and signing a certificate with
`cryptography` on one core.

    .venv/bin/python bench/issuance.py [--runs 3] [--seconds 8] [--clients 64]
                                       [--load 1 16 16@2500] [--ca-workers 2]

Each `--load` is a row: `B` is a closed loop with B CSRs per call (every client calls again
as soon as it has its answer: the most the CA answers, and a latency that is simply
clients x B / rate), `B@R` an open loop offering R issuances/s in total in calls of B
(the latency a client sees at that rate, queueing included).

The CA runs as a real `meshtls-ca serve` subprocess at its default log level (an audit
line per certificate, written to ca.log in the run's directory); the load generator is
this process (grpc.aio), on the same 2 cores. A reply counts only after the CA committed
its rows (group commit: one transaction for every request waiting at that moment). The
per-node rate limit is raised for the run (one client per node sends far above the
production default). "busy cores" is the whole machine's CPU time per second of each run
(the CA, the database, the load generator, the kernel and anything else): near the
number of cores, the box is saturated and the latency is queueing for a core.

Each row starts on a settled database (`settle`: on PostgreSQL the rows written so far
vacuumed and analyzed; checkpointed; the page cache synced), as pgbench vacuums before
each run, so a row does not pay for the clean-up of the rows before it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.svid import svid_builder
from ca_server.db.session import psycopg_connect_kwargs
from meshtls.identity.pem import certs_from_der, certs_to_pem
from meshtls.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, types_pb2

BIN = Path(sys.executable).parent
TD = "bench.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


def raw_sign_rate(seconds: float = 2.0) -> float:
    """Build + sign + PEM-encode an X509-SVID-shaped leaf with `cryptography`, one core."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TD)])
    leaf_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        now = dt.datetime.now(dt.UTC)
        cert = svid_builder(
            public_key=leaf_key,
            spiffe_id=f"spiffe://{TD}/w",
            issuer_name=name,
            issuer_public_key=ca_key.public_key(),
            not_before=now - dt.timedelta(seconds=30),
            not_after=now + dt.timedelta(hours=1),
        ).sign(ca_key, hashes.SHA256())
        cert.public_bytes(serialization.Encoding.PEM)
        count += 1
    return count / (time.perf_counter() - start)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process, its threads and its live child processes
    (the CA's `--workers`)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            pending += _children(current)
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy so far, over all cores (/proc/stat:
    user, nice, system, irq, softirq and steal; not idle or iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LoadSpec:
    csrs_per_call: int
    rate: float  # issuances/s offered in total; 0: closed loop

    @classmethod
    def parse(cls, text: str) -> LoadSpec:
        batch, _, rate = text.partition("@")
        try:
            spec = cls(int(batch), float(rate) if rate else 0.0)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: use B (closed loop, B CSRs per call) or B@R (open loop at R/s)"
            ) from None
        if spec.csrs_per_call < 1 or spec.rate < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: B must be >= 1 and R >= 0")
        return spec

    @property
    def offered(self) -> str:
        return f"{self.rate:,.0f}" if self.rate else "closed"


@dataclass
class Result:
    issued: int
    seconds: float
    latencies: list[float]
    errors: int
    server_cpu: float = 0.0
    machine_busy: float = 0.0  # CPU seconds of the whole machine (every process) in the run

    @property
    def cpu_ms_per_cert(self) -> float:
        return self.server_cpu / max(self.issued, 1) * 1000

    @property
    def rate(self) -> float:
        return self.issued / self.seconds

    @property
    def busy_cores(self) -> float:
        return self.machine_busy / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


class CAProcess:
    def __init__(self, workdir: Path, database_url: str | None, workers: int = 1) -> None:
        self.data_dir = workdir / "ca"
        self.agent = f"127.0.0.1:{free_port()}"
        self.enroll = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "MESHTLS_CA_RATE_LIMIT_PER_NODE": "1000000",
            "MESHTLS_CA_RATE_LIMIT_BURST": "1000000",
            "MESHTLS_CA_MAX_CSRS_PER_BATCH": "256",
            "MESHTLS_CA_SIGNING_RATE_LIMIT": "1000000",
        }
        args = [
            str(BIN / "meshtls-ca"),
            "serve",
            "--dev",
            "--data-dir",
            str(self.data_dir),
            "--trust-domain",
            TD,
            "--listen",
            self.agent,
            "--enroll-listen",
            self.enroll,
            "--http-listen",
            "off",
        ]
        if database_url:
            args += ["--database-url", database_url]
        if workers > 1:
            args += ["--workers", str(workers)]
        # The CA's own log level (info): an audit line per certificate, as in production,
        # written to a file as a log collector would take it.
        self.log = (workdir / "ca.log").open("wb")
        self.proc = subprocess.Popen(args, env=env, stderr=self.log)
        sock = self.data_dir / "admin.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.flush()
                tail = (workdir / "ca.log").read_text(errors="replace")[-4000:]
                raise SystemExit(f"the CA did not start; the end of its log:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()


async def enroll_clients(
    ca: CAProcess, count: int, entries_per_node: int
) -> list[tuple[grpc.aio.Channel, list[str]]]:
    sock = f"unix://{(ca.data_dir / 'admin.sock').resolve()}"
    clients = []
    async with grpc.aio.insecure_channel(sock) as admin_channel:
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        bundle = await admin.GetTrustBundle(types_pb2.GetTrustBundleRequest())
        roots = certs_to_pem(certs_from_der(bundle.root_certificates))
        async with grpc.aio.secure_channel(ca.enroll, grpc.ssl_channel_credentials(roots)) as ch:
            enroll = agent_pb2_grpc.AgentServiceStub(ch)
            for i in range(count):
                node = f"bench-{i}"
                token = (
                    await admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name=node))
                ).token
                entry_ids = []
                for k in range(entries_per_node):
                    entry = await admin.CreateEntry(
                        admin_pb2.CreateEntryRequest(
                            spiffe_id=f"spiffe://{TD}/w/{i}/{k}", node_name=node
                        )
                    )
                    entry_ids.append(entry.id)
                channel = await enroll_node_channel(enroll, ca.agent, roots, token)
                clients.append((channel, entry_ids))
    return clients


async def enroll_node_channel(
    enroll: agent_pb2_grpc.AgentServiceStub, agent_address: str, roots: bytes, token: str
) -> grpc.aio.Channel:
    """Enroll one node with `token` and open its mTLS channel to the agent listener."""
    key, csr = new_csr()
    answer = await enroll.Enroll(agent_pb2.EnrollRequest(join_token=token, csr=csr))
    chain = certs_to_pem(certs_from_der(answer.node_certificate.certificates))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return grpc.aio.secure_channel(
        agent_address, grpc.ssl_channel_credentials(roots, key_pem, chain)
    )


async def load(
    clients: list[tuple[grpc.aio.Channel, list[str]]],
    csrs_per_call: int,
    seconds: float,
    rate: float = 0.0,
) -> Result:
    """Closed loop (`rate` 0: every client calls again as soon as it has its answer) or
    open loop (`rate` issuances/s offered in total, spread evenly over the clients; each
    latency counts from the call's scheduled start, so queueing in the CA is not hidden)."""
    csrs = [new_csr()[1] for _ in range(64)]
    # The load generator's own full garbage collections (tens of ms over the channels and
    # enrollment state it built) would show up as CA latency: settle its heap first, as
    # `meshtls-ca serve` does once started.
    gc.collect()
    gc.freeze()
    latencies: list[float] = []
    issued = errors = 0
    began = time.perf_counter()
    stop_at = began + seconds

    async def worker(index: int, channel: grpc.aio.Channel, entry_ids: list[str]) -> None:
        nonlocal issued, errors
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        # Each client is one node; one call signs `csrs_per_call` of its identities, as a
        # sidecar renewing its identities together does.
        request = agent_pb2.SignIdentitiesRequest(
            requests=[
                agent_pb2.IdentityCsr(entry_id=e, csr=csrs[(index + k) % len(csrs)])
                for k, e in enumerate(entry_ids[:csrs_per_call])
            ]
        )
        interval = len(clients) * csrs_per_call / rate if rate else 0.0
        scheduled = began + interval * index / len(clients)
        while time.perf_counter() < stop_at:
            if interval:
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                started = scheduled
                scheduled += interval
            else:
                started = time.perf_counter()
            try:
                answer = await stub.SignIdentities(request)
                issued += len(answer.identities)
            except grpc.RpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*[worker(i, ch, e) for i, (ch, e) in enumerate(clients)])
    return Result(issued, time.perf_counter() - began, latencies, errors)


def start_postgres() -> tuple[object, str]:
    """A PostgreSQL server with its durable defaults (fsync and synchronous commit on,
    unlike the test suite's): a commit here is on disk before the CA answers. Its WAL is
    brought to a running server's state first (`recycle_wal`)."""
    from tests.support.postgres import start_postgres as start

    server = start(durable=True)
    try:
        server.recycle_wal()
    except BaseException:
        server.stop()
        raise
    return server, server.create_database()


def settle(database_url: str | None, data_dir: Path) -> float:
    """Start a row on a settled database and disk, as pgbench vacuums before each run. The
    closed loops before the open-loop row write ~200,000 certificates: PostgreSQL then has
    them to vacuum and analyze and the kernel hundreds of MB of dirty pages to write out,
    and that clean-up, on the same two cores during the next row, is the previous rows'
    cost, not this row's. Measured without this: autovacuum or analyze of those rows during
    an open-loop run stalled a burst of ~14 calls (1 % of the run: its p99) for 50-80 ms,
    the kernel's writeback for 20-30 ms. PostgreSQL: VACUUM (ANALYZE), CHECKPOINT; SQLite:
    a WAL checkpoint; both: sync(). Autovacuum stays on: a row whose own inserts call for
    it still pays for it. Returns the seconds it took."""
    began = time.perf_counter()
    if database_url:
        connect = psycopg_connect_kwargs(database_url, application_name="meshtls-bench")
        with psycopg.connect(**connect, autocommit=True) as conn:
            conn.execute(b"VACUUM (ANALYZE)")
            conn.execute(b"CHECKPOINT")
    else:
        with closing(sqlite3.connect(data_dir / "ca.db", timeout=30)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.sync()
    return time.perf_counter() - began


async def bench_database(name: str, url: str | None, args: argparse.Namespace) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshtls-bench-") as tmp:
        ca = CAProcess(Path(tmp), url, args.ca_workers)
        try:
            clients = await enroll_clients(
                ca, args.clients, max(spec.csrs_per_call for spec in args.load)
            )
            await load(clients, 1, 1.0)  # warm-up
            for spec in args.load:
                settled = settle(url, ca.data_dir)
                print(
                    f"({name}: database settled before the row in {settled:.1f} s)", file=sys.stderr
                )
                runs = []
                for _ in range(args.runs):
                    cpu_before = cpu_seconds(ca.proc.pid)
                    busy_before = machine_busy_seconds()
                    result = await load(clients, spec.csrs_per_call, args.seconds, spec.rate)
                    result.server_cpu = cpu_seconds(ca.proc.pid) - cpu_before
                    result.machine_busy = machine_busy_seconds() - busy_before
                    runs.append(result)
                rows.append(
                    [
                        name,
                        str(args.clients),
                        str(spec.csrs_per_call),
                        spec.offered,
                        f"{statistics.median(r.rate for r in runs):,.0f}",
                        f"{min(r.rate for r in runs):,.0f}-{max(r.rate for r in runs):,.0f}",
                        f"{statistics.median(r.pct(0.5) for r in runs):.1f}",
                        f"{statistics.median(r.pct(0.99) for r in runs):.1f}",
                        "/".join(f"{r.pct(0.99):.0f}" for r in runs),
                        f"{statistics.median(r.cpu_ms_per_cert for r in runs):.2f}",
                        "/".join(f"{r.busy_cores:.1f}" for r in runs),
                        str(sum(r.errors for r in runs)),
                    ]
                )
                print("  ".join(rows[-1]), flush=True)
            for channel, _ in clients:
                await channel.close()
        finally:
            ca.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--load",
        type=LoadSpec.parse,
        nargs="+",
        default=[LoadSpec(1, 0.0), LoadSpec(16, 0.0), LoadSpec(16, 2500.0)],
        help="rows to measure: B (closed loop, B CSRs per SignIdentities call) or B@R (open "
        "loop offering R issuances/s in total); default: 1 16 16@2500",
    )
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument(
        "--ca-workers", type=int, default=2, help="meshtls-ca serve --workers (one per core)"
    )
    args = parser.parse_args()

    raw = statistics.median(raw_sign_rate() for _ in range(3))
    print(f"raw cryptography build+sign+PEM on one core: {raw:,.0f} certificates/s", flush=True)
    header = [
        "database",
        "clients",
        "CSRs/call",
        "offered/s",
        "issued/s (median)",
        "range",
        "p50 ms",
        "p99 ms",
        "p99 by run",
        "CA CPU ms/cert",
        f"busy cores of {os.cpu_count()} by run",
        "errors",
    ]
    print("  ".join(header), flush=True)
    rows: list[list[str]] = []
    pg = None
    try:
        for db in args.databases:
            url = None
            if db == "postgres":
                pg, url = start_postgres()
            rows += asyncio.run(bench_database(db, url, args))
    finally:
        if pg is not None:
            pg.stop()  # type: ignore[attr-defined]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print(f"\nraw `cryptography` sign rate, one core: {raw:,.0f}/s")
    shutil.rmtree(Path(tempfile.gettempdir()) / "meshtls-bench", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
