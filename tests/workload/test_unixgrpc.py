"""The Unix socket gRPC server under both APIs: socket creation, peer credentials, and a
stop that ends streams with UNAVAILABLE and closes idle connections. The service is the
real Workload API fed by the real snapshot publisher; the client is grpcio."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from meshtls.clock import SystemClock
from meshtls.spiffe import workloadapi_pb2 as pb
from sidecar.identity.model import Snapshot
from sidecar.identity.publisher import SnapshotPublisher
from sidecar.workload_api.server import LocalApiServer, workload_api_server
from sidecar.workload_api.settings import SocketApiConfig
from sidecar.workload_api.unixgrpc import SocketError, bind_unix_socket, read_peer_credentials
from tests.sidecar.helpers import make_bundle, make_identity, wait_for
from tests.support.pki import ThrowawayCA

HEADER = (("workload.spiffe.io", "true"),)


@asynccontextmanager
async def serving(path: Path) -> AsyncIterator[LocalApiServer]:
    root = ThrowawayCA.root()
    made = make_identity(root, "spiffe://example.org/a", "a")
    ident = dataclasses.replace(
        made, entry=dataclasses.replace(made.entry, selectors=(f"unix:uid:{os.getuid()}",))
    )
    publisher = SnapshotPublisher()
    publisher.publish(Snapshot.build(1, None, make_bundle(root), {"a": ident}))
    server = workload_api_server(SocketApiConfig(path), publisher, SystemClock())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def fetch_stub(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
    return channel.unary_stream(
        "/SpiffeWorkloadAPI/FetchX509SVID",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.X509SVIDResponse.FromString,
    )


def test_peer_credentials_come_from_the_kernel() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        creds = read_peer_credentials(left)
    assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())


def test_the_socket_is_created_world_connectable_in_a_new_directory(socket_dir: Path) -> None:
    path = socket_dir / "new" / "api.sock"
    sock = bind_unix_socket(path, 0o666, "test")
    with sock:
        assert path.is_socket()
        assert stat.S_IMODE(path.stat().st_mode) == 0o666


def test_a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_refused(socket_dir: Path) -> None:
    stale = socket_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(stale))  # closed without unlink: nobody answers any more
    with bind_unix_socket(stale, 0o666, "test"):
        pass
    live = socket_dir / "live.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(live))
        other.listen(1)
        with pytest.raises(SocketError, match="another process serves"):
            bind_unix_socket(live, 0o666, "test")
    afile = socket_dir / "file"
    afile.write_text("x")
    with pytest.raises(SocketError, match="not a socket"):
        bind_unix_socket(afile, 0o666, "test")
    assert afile.read_text() == "x"


async def test_stop_ends_open_streams_with_unavailable(socket_dir: Path) -> None:
    path = socket_dir / "w.sock"
    async with (
        serving(path) as server,
        grpc.aio.insecure_channel(f"unix://{path}") as channel,
    ):
        call = fetch_stub(channel)(pb.X509SVIDRequest(), metadata=HEADER, timeout=10)
        first = await call.read()
        assert [s.spiffe_id for s in first.svids] == ["spiffe://example.org/a"]
        await server.stop()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 10)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not path.exists()


async def test_stop_closes_idle_connections(socket_dir: Path) -> None:
    """grpclib's own close() would leave them open, serving calls for a stopped sidecar."""
    path = socket_dir / "w.sock"
    async with (
        serving(path) as server,
        grpc.aio.insecure_channel(f"unix://{path}") as channel,
    ):
        call = fetch_stub(channel)(pb.X509SVIDRequest(), metadata=HEADER, timeout=10)
        await call.read()
        call.cancel()  # the connection stays open, idle
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        assert server.grpc.connection_count == 1
        await server.stop()
        await wait_for(
            lambda: channel.get_state() != grpc.ChannelConnectivity.READY,
            what="the client seeing its connection closed",
        )
        assert server.grpc.connection_count == 0
