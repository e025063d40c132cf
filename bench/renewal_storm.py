"""Renewal storm: after `meshtls-ca authority rotate --force`, every identity held by
simulated sidecars is re-issued at once. Reports the time until all hold a certificate from
the new intermediate, the peak issuance rate, p99 latency and failed requests (a
RESOURCE_EXHAUSTED answer, or an UNAVAILABLE one with a retry-after hint from a replica
whose signing fence is closed, is retried after the hint, as the sidecar does; a request
that still fails after that counts as failed).

    .venv/bin/python bench/renewal_storm.py [--identities 100000] [--nodes 200]
        [--databases sqlite postgres] [--ca-workers 2]

The CA runs as real `meshtls-ca serve` processes; the simulated sidecars are one asyncio
process (each node its own mTLS channel, signing its identities in batches of 100, the
CA's default batch size the sidecar uses). Setup (entries and the first issuance) is not
timed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.issuance import (
    BIN,
    TD,
    CAProcess,
    enroll_node_channel,
    new_csr,
    start_postgres,
)
from meshtls.identity.pem import certs_from_der, certs_to_pem
from meshtls.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, types_pb2

BATCH = 100


async def setup(
    ca: CAProcess, nodes: int, per_node: int
) -> list[tuple[grpc.aio.Channel, list[str]]]:
    sock = f"unix://{(ca.data_dir / 'admin.sock').resolve()}"
    async with grpc.aio.insecure_channel(sock) as admin_channel:
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        bundle = await admin.GetTrustBundle(types_pb2.GetTrustBundleRequest())
        roots = certs_to_pem(certs_from_der(bundle.root_certificates))
        semaphore = asyncio.Semaphore(64)

        async def entry(node: str, k: int) -> str:
            async with semaphore:
                made = await admin.CreateEntry(
                    admin_pb2.CreateEntryRequest(
                        spiffe_id=f"spiffe://{TD}/{node}/w{k}", node_name=node
                    )
                )
                return str(made.id)

        clients = []
        async with grpc.aio.secure_channel(ca.enroll, grpc.ssl_channel_credentials(roots)) as ch:
            enroll = agent_pb2_grpc.AgentServiceStub(ch)
            for i in range(nodes):
                node = f"storm-{i}"
                ids = await asyncio.gather(*[entry(node, k) for k in range(per_node)])
                token = (
                    await admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name=node))
                ).token
                channel = await enroll_node_channel(enroll, ca.agent, roots, token)
                clients.append((channel, list(ids)))
    return clients


async def active_intermediate_fingerprint(ca: CAProcess) -> str:
    """SHA-256 of the intermediate that is active in the journal (cluster-wide)."""
    sock = f"unix://{(ca.data_dir / 'admin.sock').resolve()}"
    async with grpc.aio.insecure_channel(sock) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        listing = await admin.ListAuthorities(admin_pb2.ListAuthoritiesRequest())
    active = [a for a in listing.authorities if a.kind == "intermediate" and a.state == "active"]
    return str(active[0].fingerprint_sha256)


async def renew_all(
    clients: list[tuple[grpc.aio.Channel, list[str]]],
) -> tuple[float, list[float], int, list[int], dict[str, int]]:
    """(seconds, latencies, failed requests, per-second issuance counts, certificates per
    issuing intermediate's SHA-256)."""
    csr = new_csr()[1]
    latencies: list[float] = []
    failed = 0
    started = time.perf_counter()
    per_second: dict[int, int] = {}
    issuers: dict[str, int] = {}

    async def node(channel: grpc.aio.Channel, ids: list[str]) -> None:
        nonlocal failed
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        for first in range(0, len(ids), BATCH):
            request = agent_pb2.SignIdentitiesRequest(
                requests=[
                    agent_pb2.IdentityCsr(entry_id=e, csr=csr) for e in ids[first : first + BATCH]
                ]
            )
            for _attempt in range(20):
                t0 = time.perf_counter()
                try:
                    answer = await stub.SignIdentities(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    hint = dict(exc.trailing_metadata() or ()).get("retry-after")
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED or (
                        exc.code() == grpc.StatusCode.UNAVAILABLE and hint is not None
                    ):
                        await asyncio.sleep(float(hint or "1"))
                        continue
                    failed += 1
                    break
                latencies.append(time.perf_counter() - t0)
                second = int(time.perf_counter() - started)
                per_second[second] = per_second.get(second, 0) + len(answer.identities)
                for identity in answer.identities:
                    issuer = hashlib.sha256(identity.certificate.certificates[1]).hexdigest()
                    issuers[issuer] = issuers.get(issuer, 0) + 1
                break
            else:
                failed += 1

    await asyncio.gather(*[node(ch, ids) for ch, ids in clients])
    seconds = time.perf_counter() - started
    counts = [per_second.get(s, 0) for s in range(int(seconds) + 1)]
    return seconds, latencies, failed, counts, issuers


async def run_one(name: str, url: str | None, args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="meshtls-storm-") as tmp:
        ca = CAProcess(Path(tmp), url, args.ca_workers)
        try:
            per_node = max(1, args.identities // args.nodes)
            clients = await setup(ca, args.nodes, per_node)
            await renew_all(clients)  # everyone holds a certificate before the storm
            rotate = await asyncio.create_subprocess_exec(
                str(BIN / "meshtls-ca"),
                "authority",
                "rotate",
                "--force",
                "--data-dir",
                str(ca.data_dir),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            assert await rotate.wait() == 0
            new_issuer = await active_intermediate_fingerprint(ca)
            seconds, latencies, failed, counts, issuers = await renew_all(clients)
            for channel, _ in clients:
                await channel.close()
        finally:
            ca.stop()
    total = per_node * args.nodes
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000 if ordered else 0.0
    return [
        name,
        f"{total:,}",
        str(args.ca_workers),
        f"{seconds:.1f}",
        f"{max(counts):,}",
        f"{statistics.median(counts) if counts else 0:,.0f}",
        f"{p99:.0f}",
        str(failed),
        f"{issuers.get(new_issuer, 0):,}",
        f"{sum(issuers.values()) - issuers.get(new_issuer, 0):,}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--ca-workers", type=int, default=2)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args()
    header = [
        "database",
        "identities",
        "CA processes",
        "storm seconds",
        "peak/s",
        "median/s",
        "p99 ms (batch of 100)",
        "failed",
        "by new CA",
        "by old CA",
    ]
    rows = []
    pg = None
    try:
        for db in args.databases:
            url = None
            if db == "postgres":
                pg, url = start_postgres()
            rows.append(asyncio.run(run_one(db, url, args)))
            print("  ".join(rows[-1]), flush=True)
    finally:
        if pg is not None:
            pg.stop()  # type: ignore[attr-defined]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
