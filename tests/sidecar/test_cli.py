"""The `meshtls-sidecar` command: startup errors, `status` output and exit codes, and the
real process run against a real CA and stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from meshtls.clock import ManualClock
from sidecar.app import SidecarApp
from sidecar.cli import format_status, main
from tests.sidecar.helpers import config_from, http_get, sidecar_document, wait_for, write_config
from tests.support.ca import running_ca
from tests.support.pki import ThrowawayCA

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def run_cli(*args: str, within: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_invalid_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", {"trust_domain": "example.org", "nod": "x"})
    code, out, err = await run_cli("run", "--config", str(path))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("meshtls-sidecar: error: invalid configuration: ")
    assert "nod: unknown key" in lines[0]
    assert "node: required" in lines[0]


async def test_status_of_an_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    with pytest.raises(SystemExit) as info:
        await asyncio.to_thread(main, ["status", "--address", f"127.0.0.1:{port}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"meshtls-sidecar: error: cannot reach the sidecar status server at 127.0.0.1:{port}"
    )


async def test_status_of_a_sidecar_that_is_not_ready_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ThrowawayCA.root().cert_pem)
    dead = f"127.0.0.1:{free_port()}"
    doc = sidecar_document(
        tmp_path,
        agent_address=dead,
        enroll_address=dead,
        bundle_path=bundle,
        token_file=tmp_path / "token",
    )
    config = config_from(tmp_path, doc)
    async with SidecarApp(config, clock=ManualClock()) as app:
        await wait_for(lambda: app.manager.health.last_error is not None, what="a failure")
        address = "{}:{}".format(*app.status.address)
        with pytest.raises(SystemExit) as info:
            await asyncio.to_thread(main, ["status", "--address", address])
        assert info.value.code == 1
        out = capsys.readouterr().out
        assert "ready:    NO - node web-1 is not enrolled; provide a join token in" in out
        assert "ca:       " in out
        with pytest.raises(SystemExit) as info:
            await asyncio.to_thread(main, ["status", "--address", address, "--json"])
        assert info.value.code == 1
        doc_out = json.loads(capsys.readouterr().out)
        assert doc_out["ready"] is False
        assert doc_out["node"]["name"] == "web-1"


def test_format_status_lists_identities() -> None:
    text = format_status(
        {
            "ready": True,
            "reason": "ready",
            "node": {
                "name": "web-1",
                "spiffe_id": "spiffe://td/meshtls/node/web-1",
                "serial": "abcdef0123456789ff",
                "expires_in_seconds": 90000,
            },
            "ca": {"address": "ca:8443", "reachable": True},
            "bundle": {"version": 3, "roots_sha256": ["aa", "bb"]},
            "identities": [
                {
                    "spiffe_id": "spiffe://td/svc/web",
                    "serial": "0123",
                    "expires_in_seconds": 1900,
                    "last_renewal": "2025-01-01T00:00:00+00:00",
                }
            ],
            "pending_identities": ["spiffe://td/svc/db"],
        }
    )
    assert "ready:    yes" in text
    assert "expires in 1d1h" in text
    assert "bundle:   version 3, 2 root(s)" in text
    assert "spiffe://td/svc/web  0123" in text
    assert "31m40s" in text
    assert "spiffe://td/svc/db" in text
    assert "pending" in text


@pytest.mark.slow
async def test_run_the_real_process_until_sigterm(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(ca.bundle_pem)
        token = tmp_path / "token"
        token.write_text(await ca.create_join_token("web-1"))
        await ca.create_entry("spiffe://example.org/svc/web", "web-1")
        port = free_port()
        doc = sidecar_document(
            tmp_path,
            agent_address=ca.agent_address,
            enroll_address=ca.enroll_address,
            bundle_path=bundle,
            token_file=token,
            files=[{"spiffe_id": "spiffe://example.org/svc/web", "dir": str(tmp_path / "out")}],
        )
        doc["status"] = {"listen": f"127.0.0.1:{port}"}
        path = write_config(tmp_path / "sidecar.yaml", doc)
        env = {k: v for k, v in os.environ.items() if k != "MESHTLS_JOIN_TOKEN"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--config",
            str(path),
            "--log-format",
            "json",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:

            async def is_ready() -> bool:
                try:
                    status, _ = await http_get(f"http://127.0.0.1:{port}/readyz")
                except OSError:
                    return False
                return status == 200

            await wait_for(is_ready, within=30, what="the sidecar process ready")
            code, out, _ = await run_cli("status", "--config", str(path))
            assert code == 0
            assert "ready:    yes" in out
            assert "spiffe://example.org/svc/web" in out
            assert (tmp_path / "out" / "svid.pem").exists()
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0
            assert time.monotonic() - started < 10
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    # gRPC's C core may write its own (non-JSON) lines to stderr; ours are all JSON objects.
    records = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert "node enrolled" in messages
    assert "sidecar stopped" in messages
    enrolled = next(r for r in records if r["message"] == "node enrolled")
    assert enrolled["node"] == "web-1"
    assert enrolled["level"] == "info"
    assert all("PRIVATE KEY" not in line for line in err.decode().splitlines())
    assert token.read_text() not in err.decode()  # the join token is never logged
