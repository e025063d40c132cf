"""The floor under any CA issuance figure: gRPC Python itself. An AgentService whose
SignIdentities does nothing (returns an empty reply) behind mutual TLS, served by N
processes on one port (SO_REUSEPORT, as `meshtls-ca serve --workers N`), called by 64
clients in a closed loop from one grpc.aio process on the same cores, as
bench/issuance.py does.

    .venv/bin/python bench/grpc_floor.py [--workers 1 2] [--clients 64] [--seconds 6]

Whatever the CA does per call comes on top of these calls/s and latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import socket
import statistics
import sys
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from meshtls.v1 import agent_pb2, agent_pb2_grpc

Pem = tuple[bytes, bytes]  # (private key, certificate)


def _issue(
    name: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return key, builder.sign(issuer[0] if issuer else key, hashes.SHA256())


def _pem(pair: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> Pem:
    key, cert = pair
    return (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )


class EmptyAgent(agent_pb2_grpc.AgentServiceServicer):
    async def SignIdentities(
        self, request: agent_pb2.SignIdentitiesRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.SignIdentitiesResponse:
        context.auth_context()  # the CA reads the peer certificate on every call
        return agent_pb2.SignIdentitiesResponse()


def serve(port: int, root: bytes, server_pem: Pem) -> None:
    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        # Only SignIdentities is implemented; the others answer UNIMPLEMENTED.
        agent = EmptyAgent()  # type: ignore[abstract]
        agent_pb2_grpc.add_AgentServiceServicer_to_server(agent, server)
        credentials = grpc.ssl_server_credentials([server_pem], root, require_client_auth=True)
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def call_loop(
    port: int, root: bytes, client_pem: Pem, clients: int, seconds: float
) -> tuple[float, float, float]:
    """(calls/s, p50 ms, p99 ms) of `clients` channels calling in a closed loop."""
    channels = [
        grpc.aio.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(root, client_pem[0], client_pem[1]),
            options=[
                ("grpc.ssl_target_name_override", "localhost"),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        for _ in range(clients)
    ]
    latencies: list[float] = []
    stop_at = 0.0

    async def worker(channel: grpc.aio.Channel) -> None:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.SignIdentitiesRequest()
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await stub.SignIdentities(request)
            latencies.append(time.perf_counter() - started)

    stop_at = time.perf_counter() + 1.0  # warm-up: connect every channel
    await asyncio.gather(*[worker(c) for c in channels])
    latencies.clear()
    began = time.perf_counter()
    stop_at = began + seconds
    await asyncio.gather(*[worker(c) for c in channels])
    elapsed = time.perf_counter() - began
    for channel in channels:
        await channel.close()
    ordered = sorted(latencies)
    return (
        len(ordered) / elapsed,
        ordered[len(ordered) // 2] * 1000,
        ordered[int(len(ordered) * 0.99)] * 1000,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    ca = _issue("grpc-floor CA", None)
    root = ca[1].public_bytes(serialization.Encoding.PEM)
    server_pem, client_pem = _pem(_issue("localhost", ca)), _pem(_issue("client", ca))
    print("| server processes | clients | empty calls/s (median) | p50 ms | p99 ms |")
    print("|------------------|---------|------------------------|--------|--------|")
    for workers in args.workers:
        port = free_port()
        processes = [
            multiprocessing.Process(target=serve, args=(port, root, server_pem), daemon=True)
            for _ in range(workers)
        ]
        for process in processes:
            process.start()
        try:
            runs = [
                asyncio.run(call_loop(port, root, client_pem, args.clients, args.seconds))
                for _ in range(args.runs)
            ]
        finally:
            for process in processes:
                process.terminate()
                process.join()
        rate, p50, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {workers} | {args.clients} | {rate:,.0f} | {p50:.1f} | {p99:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
