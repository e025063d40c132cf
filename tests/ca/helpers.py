"""Helpers for the CA's end-to-end tests: CSRs, enrolling a node over the real enrollment
listener, channels to the real listeners, a snapshot of the database (read through the
Store's read API) to prove refused calls change nothing, and the real `meshtls-ca` console
script run as a subprocess without blocking the event loop the in-process CA serves on."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from ca_server.db.store import Store
from ca_server.domain import AuditEvent, CertificateRecord, Entry, JoinToken, Node
from ca_server.services.nodes import hash_token
from meshtls.identity.pem import certs_from_der, certs_to_pem
from meshtls.identity.x509 import serial_hex
from meshtls.v1 import agent_pb2, agent_pb2_grpc
from tests.support.ca import RunningCA
from tests.support.pki import KeyKind, PrivateKey, make_key

CLI = Path(sys.executable).parent / "meshtls-ca"
RPC_TIMEOUT = 15.0
BIG = 1_000_000


def build_csr(
    key: PrivateKey,
    *,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    common_name: str = "ignored by the CA",
) -> bytes:
    """A DER PKCS#10 request signed by `key`, asking for whatever names it is told to."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER)


def key_and_csr(kind: KeyKind = "p256") -> tuple[PrivateKey, bytes]:
    key = make_key(kind)
    return key, build_csr(key)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def der_chain(blobs: Sequence[bytes]) -> list[x509.Certificate]:
    return certs_from_der(list(blobs))


@dataclass
class NodeIdentity:
    """What an enrolled node holds: its key and the chain the CA returned (leaf first)."""

    name: str
    key_pem: bytes
    chain: list[x509.Certificate]

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        return serial_hex(self.cert)

    @property
    def chain_pem(self) -> bytes:
        return certs_to_pem(self.chain)


def enrollment_channel(ca: RunningCA) -> grpc.aio.Channel:
    """Server-authenticated TLS to the enrollment listener."""
    return grpc.aio.secure_channel(ca.enroll_address, grpc.ssl_channel_credentials(ca.bundle_pem))


def agent_channel(ca: RunningCA, key: bytes, chain: bytes) -> grpc.aio.Channel:
    """Mutual TLS to the agent listener with the given client key and chain (PEM)."""
    credentials = grpc.ssl_channel_credentials(ca.bundle_pem, key, chain)
    return grpc.aio.secure_channel(ca.agent_address, credentials)


def node_channel(ca: RunningCA, node: NodeIdentity) -> grpc.aio.Channel:
    return agent_channel(ca, node.key_pem, node.chain_pem)


async def enroll_with(ca: RunningCA, token: str, csr: bytes) -> agent_pb2.EnrollResponse:
    async with enrollment_channel(ca) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        response: agent_pb2.EnrollResponse = await stub.Enroll(
            agent_pb2.EnrollRequest(join_token=token, csr=csr), timeout=RPC_TIMEOUT
        )
        return response


async def enroll_node(ca: RunningCA, name: str) -> NodeIdentity:
    """Create a join token for `name` and enroll with it, as a sidecar would."""
    token = await ca.create_join_token(name)
    key, csr = key_and_csr()
    response = await enroll_with(ca, token, csr)
    return NodeIdentity(name, key_pem(key), der_chain(response.node_certificate.certificates))


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error a call ends with; fails the test if the call succeeds."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded but was expected to be refused")


async def sign_one(
    stub: agent_pb2_grpc.AgentServiceStub, entry_id: str, csr: bytes
) -> agent_pb2.SignIdentitiesResponse:
    response: agent_pb2.SignIdentitiesResponse = await stub.SignIdentities(
        agent_pb2.SignIdentitiesRequest(
            requests=[agent_pb2.IdentityCsr(entry_id=entry_id, csr=csr)]
        ),
        timeout=RPC_TIMEOUT,
    )
    return response


# The database, through the Store's read API -------------------------------------------------


@dataclass(frozen=True)
class DbState:
    """Everything a refused call could have written: certificates, nodes, entries, audit."""

    certificates: tuple[CertificateRecord, ...]
    nodes: tuple[Node, ...]
    entries: tuple[Entry, ...]
    audit: tuple[AuditEvent, ...]

    def counts(self) -> dict[str, int]:
        return {
            "certificates": len(self.certificates),
            "nodes": len(self.nodes),
            "entries": len(self.entries),
            "audit": len(self.audit),
        }


def store_of(ca: RunningCA) -> Store:
    assert ca.server is not None, "the CA is not running"
    assert ca.server.ctx is not None
    return ca.server.ctx.store


def db_state(ca: RunningCA) -> DbState:
    with store_of(ca).read() as tx:
        return DbState(
            certificates=tuple(tx.list_certificates(limit=BIG)),
            nodes=tuple(tx.list_nodes(limit=BIG)),
            entries=tuple(tx.list_entries(limit=BIG)),
            audit=tuple(tx.list_audit_events(limit=BIG)),
        )


def join_token(ca: RunningCA, token: str) -> JoinToken | None:
    with store_of(ca).read() as tx:
        return tx.get_join_token(hash_token(token))


def certificate(ca: RunningCA, serial: str) -> CertificateRecord | None:
    with store_of(ca).read() as tx:
        return tx.get_certificate(serial)


def audit_for(ca: RunningCA, subject: str) -> list[AuditEvent]:
    with store_of(ca).read() as tx:
        return tx.list_audit_events(limit=BIG, subject=subject)


# Processes and polling -------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment minus every MESHTLS_* variable (a KEK in the caller's environment
    must not leak into a test), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHTLS")}
    env.update(extra or {})
    return env


def assert_one_line_refusal(result: CliResult, *expected: str) -> None:
    """A non-zero exit with one clear line on stderr (no traceback) naming the problem."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr}"
    assert lines[0].startswith("meshtls-ca: "), lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert result.stdout == ""


async def run_tool(
    program: str | Path,
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    within: float = 60.0,
) -> CliResult:
    """Run a program to completion without blocking the loop an in-process CA serves on."""
    process = await asyncio.create_subprocess_exec(
        str(program),
        *[str(a) for a in args],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(env),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


async def run_cli(
    *args: str | Path, env: Mapping[str, str] | None = None, within: float = 60.0
) -> CliResult:
    """Run the real `meshtls-ca ARGS` console script."""
    return await run_tool(CLI, *args, env=env, within=within)


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, within: float = 20.0, what: str = "condition"
) -> None:
    """Poll `predicate` with a short, growing interval until it holds."""
    deadline = time.monotonic() + within
    delay = 0.01
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
