"""Real outside clients of the Workload API: the PyPI `spiffe` client (run in a thread, it is
synchronous), raw grpcio calls (to send what that client never sends, e.g. no header),
and the same `spiffe` client in a child process that drops to another uid/gid."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient, X509Source
from spiffe.svid.x509_svid import X509Svid

from meshtls.spiffe import workloadapi_pb2 as pb

HEADER = (("workload.spiffe.io", "true"),)


def uri(socket: Path) -> str:
    return f"unix://{socket}"


def fetch_svids(socket: Path) -> list[X509Svid]:
    with WorkloadApiClient(uri(socket)) as client:
        return client.fetch_x509_svids(timeout=10)


def fetch_bundle_roots(socket: Path, trust_domain: str) -> set[bytes]:
    """DER of the roots FetchX509Bundles gives for `trust_domain`."""
    from spiffe import TrustDomain

    with WorkloadApiClient(uri(socket)) as client:
        bundles = client.fetch_x509_bundles(timeout=10)
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(trust_domain))
    assert bundle is not None, f"no bundle for {trust_domain}"
    return {c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities}


def open_source(socket: Path) -> X509Source:
    return X509Source(socket_path=uri(socket), timeout_in_seconds=10)


def default_serial(source: X509Source) -> int:
    return source.get_x509_context().default_svid.leaf.serial_number


async def raw_call(
    socket: Path, method: str, request: Any, reply: type[Any], *, header: bool = True
) -> tuple[grpc.StatusCode, str, list[Any]]:
    """Call /SpiffeWorkloadAPI/`method` with grpcio; (status, details, messages received)."""
    unary = method in {"FetchJWTSVID", "ValidateJWTSVID"}
    path = f"/SpiffeWorkloadAPI/{method}"
    metadata = HEADER if header else ()
    received: list[Any] = []
    async with grpc.aio.insecure_channel(uri(socket)) as channel:
        try:
            if unary:
                received.append(
                    await channel.unary_unary(
                        path,
                        request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=reply.FromString,
                    )(request, metadata=metadata, timeout=10)
                )
            else:
                call = channel.unary_stream(
                    path,
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=reply.FromString,
                )(request, metadata=metadata, timeout=10)
                received.append(await call.read())  # the stream stays open: one is enough
                call.cancel()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", received
    return grpc.StatusCode.OK, "", received


CHILD = """
import json, os, sys
from spiffe import WorkloadApiClient
from spiffe.workloadapi.errors import FetchX509SvidError
socket_path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Everything is imported as root (the interpreter may live where others cannot read);
# the connection is made after the drop, so the kernel records the new uid and gid.
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
try:
    with WorkloadApiClient("unix://" + socket_path) as client:
        svids = client.fetch_x509_svids(timeout=10)
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(),
                      "ids": sorted(str(s.spiffe_id) for s in svids)}))
except FetchX509SvidError as exc:
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "error": str(exc)}))
"""


async def fetch_as(socket: Path, uid: int, gid: int) -> dict[str, Any]:
    """The `spiffe` client in a child process running as uid/gid; its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(socket),
        str(uid),
        str(gid),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    report: dict[str, Any] = json.loads(out)
    return report


__all__ = ["pb"]  # the messages, for the tests that build requests
