"""`meshtls-sidecar run --config` with proxy listeners, as a real process (on uvloop when
installed) against a real CA: traffic flows from its outbound listener through its own
inbound listener to an app; SIGHUP applies a new listener and rejects an invalid file
while the old listeners keep serving; SIGTERM stops accepting at once and exits as soon as
the open connection finishes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tests.proxy.helpers import WEB, App, echo, exchange, inbound, outbound
from tests.sidecar.helpers import sidecar_document, wait_for, write_config
from tests.support.ca import running_ca

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def answers(port: int) -> bool:
    try:
        return await exchange(port, b"ping", within=2) == b"ping"
    except OSError:
        return False


async def test_sighup_reloads_and_sigterm_drains(tmp_path: Path) -> None:
    async with running_ca(tmp_path / "ca-home") as ca:
        await ca.create_entry(WEB, "web-1")
        app = await App(echo).start()
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(ca.bundle_pem)
        token = tmp_path / "token"
        token.write_text(await ca.create_join_token("web-1"))
        doc: dict[str, Any] = sidecar_document(
            tmp_path,
            agent_address=ca.agent_address,
            enroll_address=ca.enroll_address,
            bundle_path=bundle,
            token_file=token,
        )
        in_port, out_port, new_port = free_port(), free_port(), free_port()
        web_in = inbound("web", app.address, [WEB], listen=f"127.0.0.1:{in_port}")
        to_web = outbound("to-web", f"127.0.0.1:{in_port}", identity=WEB)
        to_web["listen"] = f"127.0.0.1:{out_port}"
        doc["inbound"], doc["outbound"] = [web_in], [to_web]
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
        lines: list[str] = []

        async def collect() -> None:
            assert proc.stderr is not None
            async for line in proc.stderr:
                lines.append(line.decode())

        collector = asyncio.create_task(collect())

        def logged(prefix: str) -> bool:
            return any(f'"message": "{prefix}' in line for line in lines)

        try:
            await wait_for(lambda: answers(out_port), within=30, what="traffic through the sidecar")

            # SIGHUP with one more outbound listener: it starts serving.
            extra = outbound("again", f"127.0.0.1:{in_port}", identity=WEB)
            extra["listen"] = f"127.0.0.1:{new_port}"
            doc["outbound"] = [to_web, extra]
            write_config(path, doc)
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: answers(new_port), within=10, what="the reloaded listener")

            # SIGHUP with an invalid file: rejected, everything keeps serving.
            doc["outbound"][1]["expect"] = "nobody"
            write_config(path, doc)
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: logged("config reload rejected"), what="the rejection")
            assert await answers(out_port)
            assert await answers(new_port)

            # SIGTERM while a connection is open: no new connections, the open one works.
            reader, writer = await asyncio.open_connection("127.0.0.1", out_port)
            writer.write(b"open")
            assert await reader.readexactly(4) == b"open"
            proc.send_signal(signal.SIGTERM)

            async def refused() -> bool:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", new_port)
                except ConnectionRefusedError:
                    return True
                w.close()
                return False

            await wait_for(refused, within=10, what="the listeners to stop accepting")
            writer.write(b"still")
            assert await reader.readexactly(5) == b"still"
            assert proc.returncode is None
            started = time.monotonic()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await asyncio.wait_for(proc.wait(), 30)
            await collector
            assert proc.returncode == 0
            assert time.monotonic() - started < 10
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await app.stop()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert "proxy configuration reloaded" in messages
    rejected = [m for m in messages if m.startswith("config reload rejected")]
    assert len(rejected) == 1
    assert "outbound[1].expect" in rejected[0]
    access = [r for r in records if r["logger"] == "sidecar.proxy.access"]
    assert {r["direction"] for r in access} == {"inbound", "outbound"}
    assert all(r["peer_id"] == WEB for r in access if r["result"] == "ok")
    assert "sidecar stopped" in messages
