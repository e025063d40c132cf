"""Two `meshtls-ca serve` processes on one real PostgreSQL: a replica killed with SIGKILL in
the middle of a rotation (the next intermediate prepared and published, not yet active)
leaves a consistent journal, and the survivor completes the rotation once the dead
replica's lease has run out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.ca.helpers import CLI, clean_env, run_cli, wait_for

pytestmark = pytest.mark.postgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def replica(home: Path, database_url: str, kek: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = clean_env(
        {
            "MESHTLS_CA_ROTATION_LEASE": "2s",
            "MESHTLS_CA_ROTATION_MIN_PROPAGATION": "1h",  # only a forced rotation activates
            "MESHTLS_CA_ROTATION_CHECK_INTERVAL": "1s",
        }
    )
    process = subprocess.Popen(
        [
            str(CLI),
            "serve",
            "--data-dir",
            str(home),
            "--database-url",
            database_url,
            "--kek-file",
            str(kek),
            "--listen",
            f"127.0.0.1:{_free_port()}",
            "--enroll-listen",
            f"127.0.0.1:{_free_port()}",
            "--http-listen",
            "off",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


async def _authorities(home: Path) -> list[dict[str, object]]:
    listing = await run_cli("authority", "list", "--json", "--data-dir", home)
    assert listing.returncode == 0, listing.stderr
    return list(json.loads(listing.stdout))


async def test_survivor_completes_a_rotation_after_a_replica_is_killed(
    tmp_path: Path, postgres_server: object
) -> None:
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    kek = tmp_path / "kek"
    assert (await run_cli("kek", "generate", kek)).returncode == 0
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    with replica(home_a, url, kek) as a:
        await wait_for(_socket_ready(home_a), within=30, what="replica a")
        with replica(home_b, url, kek):
            await wait_for(_socket_ready(home_b), within=30, what="replica b")
            rotated = await run_cli("authority", "rotate", "--data-dir", home_a)
            assert rotated.returncode == 0, rotated.stderr
            assert "prepare_intermediate" in rotated.stdout
            prepared = [x for x in await _authorities(home_a) if x["state"] == "prepared"]
            assert len(prepared) == 1

            os.kill(a.pid, signal.SIGKILL)  # mid-rotation: prepared, not activated
            a.wait(timeout=10)

            journal = await _authorities(home_b)
            assert [x["id"] for x in journal if x["state"] == "prepared"] == [prepared[0]["id"]]
            assert sum(x["state"] == "active" and x["kind"] == "intermediate" for x in journal) == 1

            async def survivor_activates() -> bool:
                # Refused (nothing done) while the dead replica's lease lasts; then it runs.
                await run_cli("authority", "rotate", "--force", "--data-dir", home_b)
                states = {x["id"]: x["state"] for x in await _authorities(home_b)}
                return states.get(prepared[0]["id"]) == "active"

            await wait_for(survivor_activates, within=30, what="the survivor to take over")
            final = await _authorities(home_b)
    active = [x for x in final if x["state"] == "active" and x["kind"] == "intermediate"]
    assert [x["id"] for x in active] == [prepared[0]["id"]]
    assert not [x for x in final if x["state"] == "prepared"]
    assert sum(x["state"] == "active" and x["kind"] == "root" for x in final) == 1


def _socket_ready(home: Path):  # type: ignore[no-untyped-def]
    async def ready() -> bool:
        if not (home / "admin.sock").exists():
            return False
        status = await run_cli("status", "--data-dir", home)
        return status.returncode == 0

    return ready
