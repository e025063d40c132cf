"""`meshtls-ca serve --workers 2`: two processes share the listeners (SO_REUSEPORT), every
enrollment on a fresh connection works whichever process takes it, both processes record
into the one database, and SIGTERM to the first stops them all."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import grpc
from cryptography import x509

from meshtls.v1 import agent_pb2, agent_pb2_grpc
from tests.ca.helpers import CLI, clean_env, key_and_csr, run_cli, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(home: Path, enroll: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(CLI),
            "serve",
            "--dev",
            "--data-dir",
            str(home),
            "--workers",
            "2",
            "--listen",
            f"127.0.0.1:{_free_port()}",
            "--enroll-listen",
            enroll,
            "--http-listen",
            "off",
            "--log-level",
            "warning",
        ],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text()


async def test_two_worker_processes_share_the_listeners(tmp_path: Path) -> None:
    home = tmp_path / "ca"
    enroll = f"127.0.0.1:{_free_port()}"
    process = _start(home, enroll)
    try:

        async def serving() -> bool:
            if process.poll() is not None or not _children(process.pid):
                return False
            return (await run_cli("status", "--data-dir", home)).returncode == 0

        await wait_for(serving, within=30, what="the CA and its worker")
        worker_pid = _children(process.pid)[0]
        bundle = (await run_cli("bundle", "show", "--data-dir", home)).stdout.encode()
        serials = set()
        for i in range(12):
            token = await run_cli("token", "create", "--node", f"n{i}", "--data-dir", home)
            async with grpc.aio.secure_channel(enroll, grpc.ssl_channel_credentials(bundle)) as ch:
                answer = await agent_pb2_grpc.AgentServiceStub(ch).Enroll(
                    agent_pb2.EnrollRequest(join_token=token.stdout.strip(), csr=key_and_csr()[1])
                )
            leaf = answer.node_certificate.certificates[0]
            serials.add(x509.load_der_x509_certificate(leaf).serial_number)
        assert len(serials) == 12
        listing = await run_cli("node", "list", "--data-dir", home)
        assert all(f"n{i} " in listing.stdout for i in range(12))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert _gone(worker_pid)


async def test_workers_need_fixed_ports(tmp_path: Path) -> None:
    result = await run_cli(
        "serve",
        "--dev",
        "--data-dir",
        tmp_path / "ca",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "off",
    )
    assert result.returncode == 2
    assert "--workers needs fixed ports" in result.stderr
