"""Two `meshtls-ca serve` processes on one real PostgreSQL: a replica killed with SIGKILL in
the middle of a rotation (the next intermediate prepared and published, not yet active)
leaves a consistent journal, and the survivor completes the rotation once the dead
replica's lease has run out; a revocation made on one replica reaches a real sidecar
connected only to the other in under 2 s (pushed: the replicas poll only every 30 s), and
the sidecar replaces its revoked identity."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshtls.identity.ids import SpiffeId
from sidecar.app import SidecarApp
from tests.ca.helpers import CLI, clean_env, run_cli, wait_for
from tests.sidecar.helpers import config_from, sidecar_document

pytestmark = pytest.mark.postgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def replica(
    home: Path,
    database_url: str,
    kek: Path,
    *,
    ports: tuple[int, int] | None = None,
    settings: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`meshtls-ca serve` on (agent, enrollment) `ports` (free ones by default)."""
    agent_port, enroll_port = ports or (_free_port(), _free_port())
    env = clean_env(
        {
            "MESHTLS_CA_ROTATION_LEASE": "2s",
            "MESHTLS_CA_ROTATION_MIN_PROPAGATION": "1h",  # only a forced rotation activates
            "MESHTLS_CA_ROTATION_CHECK_INTERVAL": "1s",
            **(settings or {}),
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
            f"127.0.0.1:{agent_port}",
            "--enroll-listen",
            f"127.0.0.1:{enroll_port}",
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


WEB = SpiffeId.parse("spiffe://example.org/svc/web")


async def _cli_out(*args: str | Path) -> str:
    done = await run_cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_revocation_on_one_replica_reaches_a_sidecar_of_the_other(
    tmp_path: Path, postgres_server: object
) -> None:
    url = postgres_server.create_database()  # type: ignore[attr-defined]
    kek = tmp_path / "kek"
    assert (await run_cli("kek", "generate", kek)).returncode == 0
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    slow_poll = {"MESHTLS_CA_TRUST_POLL_INTERVAL": "120s"}
    ports_b = (_free_port(), _free_port())
    with replica(home_a, url, kek, settings=slow_poll):
        # One at a time: the first one migrates and bootstraps the database.
        await wait_for(_socket_ready(home_a), within=30, what="replica a")
        with replica(home_b, url, kek, ports=ports_b, settings=slow_poll):
            await wait_for(_socket_ready(home_b), within=30, what="replica b")
            await _sidecar_hears_of_revocation(tmp_path, home_a, home_b, ports_b)


async def _sidecar_hears_of_revocation(
    tmp_path: Path, home_a: Path, home_b: Path, ports_b: tuple[int, int]
) -> None:
    side = tmp_path / "sidecar"
    side.mkdir()
    bundle = side / "bundle.pem"
    bundle.write_text(await _cli_out("bundle", "show", "--data-dir", home_b))
    token = side / "token"
    token.write_text(
        (await _cli_out("token", "create", "--node", "web-1", "--data-dir", home_b)).strip()
    )
    await _cli_out(
        "entry", "create", "--spiffe-id", str(WEB), "--node", "web-1", "--data-dir", home_b
    )  # fmt: skip
    doc = sidecar_document(
        side,
        agent_address=f"127.0.0.1:{ports_b[0]}",
        enroll_address=f"127.0.0.1:{ports_b[1]}",
        bundle_path=bundle,
        token_file=token,
    )
    async with SidecarApp(config_from(side, doc)) as app:
        await wait_for(lambda: _async(app.manager.readiness()[0]), within=30, what="sidecar ready")
        held = app.manager.snapshot().by_spiffe_id(WEB)
        assert held is not None
        serial = held.svid.serial
        revoked = await run_cli("cert", "revoke", serial, "--data-dir", home_a)
        assert revoked.returncode == 0, revoked.stderr
        done_at = time.monotonic()
        await wait_for(
            lambda: _async(serial in app.manager.snapshot().revoked),
            within=5,
            what="the revocation to reach the sidecar of replica b",
        )
        took = time.monotonic() - done_at
        assert took < 2.0, f"the revocation took {took:.2f}s"

        def replaced() -> bool:
            now = app.manager.snapshot().by_spiffe_id(WEB)
            return now is not None and now.svid.serial != serial

        await wait_for(lambda: _async(replaced()), within=10, what="a new identity")


async def _async(value: bool) -> bool:
    return value
