"""`meshtls-ca serve` as a real process: it refuses to start without a key-encryption key,
starts (loudly) in dev mode, starts with a KEK file made by `meshtls-ca kek generate`,
refuses a KEK file others can read, stops cleanly on SIGTERM, and never prints the KEK."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_server.authority.kek import generate_kek_file
from tests.ca.helpers import CLI, clean_env, run_cli, wait_for

LOOPBACK_ANY_PORT = "127.0.0.1:0"


def serve_args(data_dir: Path, *extra: str | Path) -> list[str]:
    return [
        "serve",
        "--data-dir",
        str(data_dir),
        "--trust-domain",
        "proc.example.org",
        "--listen",
        LOOPBACK_ANY_PORT,
        "--enroll-listen",
        LOOPBACK_ANY_PORT,
        "--http-listen",
        "off",
        *[str(e) for e in extra],
    ]


@dataclass
class ServeProcess:
    process: asyncio.subprocess.Process
    admin_socket: Path
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    _done: bool = field(default=False, repr=False)

    @property
    def finished(self) -> bool:
        """True once `terminate` collected the exit code and the output."""
        return self._done

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    async def admin_health(self) -> bool:
        """True once the admin socket answers a standard health check with SERVING."""
        if self.process.returncode is not None:
            raise AssertionError(f"meshtls-ca serve exited early with {self.process.returncode}")
        if not self.admin_socket.exists():
            return False
        async with grpc.aio.insecure_channel(f"unix://{self.admin_socket.resolve()}") as channel:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    async def terminate(self, within: float = 30.0) -> int:
        """SIGTERM, then collect the exit code and everything the process printed."""
        if not self._done:
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(self.process.communicate(), within)
            self.stdout, self.stderr = out.decode(), err.decode()
            self.returncode = self.process.returncode
            self._done = True
        assert self.returncode is not None
        return self.returncode


@asynccontextmanager
async def serving(
    data_dir: Path, *extra: str | Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[ServeProcess]:
    """`meshtls-ca serve`, up and healthy; killed if the test fails before stopping it."""
    process = await asyncio.create_subprocess_exec(
        str(CLI),
        *serve_args(data_dir, *extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(env),
    )
    served = ServeProcess(process, data_dir / "admin.sock")
    try:
        await wait_for(served.admin_health, within=30, what="meshtls-ca serve to be healthy")
        yield served
    finally:
        if process.returncode is None and not served.finished:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def test_serve_without_a_kek_refuses_to_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "ca"
    result = await run_cli(*serve_args(data_dir))
    assert result.returncode == 2, result
    assert "--kek-file" in result.stderr
    assert "--dev" in result.stderr
    assert "configuration error" in result.stderr
    assert not (data_dir / "admin.sock").exists()


async def test_serve_dev_starts_warns_and_stops_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "ca"
    async with serving(data_dir, "--dev") as served:
        status = await run_cli("status", "--data-dir", data_dir)
        assert status.returncode == 0, status.stderr
        assert "proc.example.org" in status.stdout
        code = await served.terminate()
    assert code == 0, served.output
    assert "DEV MODE" in served.output
    assert "Never use --dev in production" in served.output
    kek = (data_dir / "dev-kek").read_text().strip()
    assert len(kek) == 44
    assert kek not in served.output


async def test_kek_generate_then_serve_with_the_kek_file(tmp_path: Path) -> None:
    kek_file = tmp_path / "kek"
    generated = await run_cli("kek", "generate", kek_file)
    assert generated.returncode == 0, generated.stderr
    assert kek_file.stat().st_mode & 0o777 == 0o600
    kek = kek_file.read_text().strip()
    assert kek not in generated.stdout + generated.stderr

    again = await run_cli("kek", "generate", kek_file)
    assert again.returncode != 0, "an existing KEK file must never be overwritten"
    assert kek_file.read_text().strip() == kek

    data_dir = tmp_path / "ca"
    async with serving(data_dir, "--kek-file", kek_file) as served:
        code = await served.terminate()
    assert code == 0, served.output
    assert "DEV MODE" not in served.output
    assert not (data_dir / "dev-kek").exists()
    assert kek not in served.output


async def test_serve_with_the_kek_in_the_environment_never_prints_it(tmp_path: Path) -> None:
    kek_file = tmp_path / "kek"
    generate_kek_file(kek_file)
    kek = kek_file.read_text().strip()
    async with serving(tmp_path / "ca", env={"MESHTLS_CA_KEK": kek}) as served:
        code = await served.terminate()
    assert code == 0, served.output
    assert kek not in served.output
    assert "DEV MODE" not in served.output


async def test_serve_refuses_a_kek_file_others_can_read(tmp_path: Path) -> None:
    kek_file = tmp_path / "kek"
    generate_kek_file(kek_file)
    kek_file.chmod(0o644)
    result = await run_cli(*serve_args(tmp_path / "ca", "--kek-file", kek_file))
    assert result.returncode == 2, result
    assert "0644" in result.stderr
    assert f"chmod 600 {kek_file}" in result.stderr
    assert kek_file.read_text().strip() not in result.stdout + result.stderr
    assert not (tmp_path / "ca" / "admin.sock").exists()
