"""`make run`: the whole mesh on this machine (SQLite, loopback).

A CA; two sidecars, `web-1` and `api-1`, enrolled with one-time tokens; and two sample
services that know nothing about TLS: `web` calls `api` every half second through its
sidecar's outbound listener, the api sidecar's inbound listener checks that the caller is
spiffe://example.org/svc/web and tells the app who called (PROXY protocol v2). The demo
shows the requests flowing, a plaintext client and a client with another CA's certificate
being refused, and identities (60 s TTL, renewed every ~6 s here) rotating under traffic
without a failed request.

Everything lives in ./.meshtls/quickstart (removed at each start). The CA runs with --dev,
which generates a throwaway key-encryption key: never do that in production.
Ctrl-C stops everything; --once stops after both identities have rotated under traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.demo.probes import foreign_ca_client, plaintext_client, refusals  # noqa: E402

BIN = Path(sys.executable).parent
TRUST_DOMAIN = "example.org"
WEB_ID = "spiffe://example.org/svc/web"
API_ID = "spiffe://example.org/svc/api"
APPS = [sys.executable, str(ROOT / "scripts" / "demo" / "apps.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def ca(*args: str, data_dir: Path) -> str:
    out = subprocess.run(
        [str(BIN / "meshtls-ca"), *args, "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float = 30.0,
    procs: Sequence[subprocess.Popen[bytes] | subprocess.Popen[str]] = (),
) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(
                    f"{what}: a process exited early (code {proc.returncode}); see the log above"
                )
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    raise SystemExit(f"timed out waiting for {what}")


def sidecar_status(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as answer:
        document: dict[str, object] = json.loads(answer.read())
        return document


def serials(port: int) -> dict[str, str]:
    identities = sidecar_status(port).get("identities", [])
    assert isinstance(identities, list)
    return {str(i["spiffe_id"]): str(i["serial"]) for i in identities}


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


class Traffic:
    """Reads the web service's output: one line per request."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.ok = 0
        self.failed = 0
        self.last = ""
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            verdict, _, rest = line.strip().partition(" ")
            number, _, answer = rest.partition(" ")
            if verdict == "ok":
                self.ok += 1
            else:
                self.failed += 1
            print(f"    web -> api #{number}: {answer if verdict == 'ok' else 'FAILED ' + answer}")


def sidecar_config(
    directory: Path, node: str, agent: str, enroll: str, status_port: int
) -> dict[str, object]:
    return {
        "trust_domain": TRUST_DOMAIN,
        "node": node,
        "state_dir": str(directory / "state"),
        "ca": {
            "address": agent,
            "enroll_address": enroll,
            "trust_bundle": str(directory.parent / "bundle.pem"),
            "join_token_file": str(directory / "token"),
        },
        "status": {"listen": f"127.0.0.1:{status_port}"},
        # Renew at ~10 % of the 60 s lifetime, so that rotations happen while you watch.
        "renewal": {"fraction": 0.1, "jitter": 0.02},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--once", action="store_true", help="stop after both identities rotated")
    parser.add_argument("--dir", type=Path, default=ROOT / ".meshtls" / "quickstart")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between requests")
    args = parser.parse_args()

    base: Path = args.dir
    shutil.rmtree(base, ignore_errors=True)
    ca_dir = base / "ca"
    web_dir, api_dir = base / "web-1", base / "api-1"
    for directory in (web_dir, api_dir):
        directory.mkdir(parents=True, mode=0o700)
    agent, enroll = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    web_status, api_status = free_port(), free_port()
    api_app, api_inbound, web_outbound = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        step(f"starting the CA (trust domain {TRUST_DOMAIN}, SQLite in {ca_dir})")
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "meshtls-ca"),
                    "serve",
                    "--dev",
                    "--data-dir",
                    str(ca_dir),
                    "--trust-domain",
                    TRUST_DOMAIN,
                    "--listen",
                    agent,
                    "--enroll-listen",
                    enroll,
                    "--http-listen",
                    "off",
                    "--log-level",
                    "warning",
                ],
                env=env,
            )
        )
        wait_for("the CA admin socket", lambda: (ca_dir / "admin.sock").exists(), procs=procs)
        wait_for("the CA", lambda: bool(ca("status", data_dir=ca_dir)), procs=procs)

        step("registering svc/web on node web-1 and svc/api on node api-1 (60 s certificates)")
        for spiffe_id, node, directory in ((WEB_ID, "web-1", web_dir), (API_ID, "api-1", api_dir)):
            ca(
                "entry",
                "create",
                "--spiffe-id",
                spiffe_id,
                "--node",
                node,
                "--ttl",
                "1m",
                data_dir=ca_dir,
            )
            token = ca("token", "create", "--node", node, data_dir=ca_dir).strip()
            (directory / "token").write_text(token + "\n")
            os.chmod(directory / "token", 0o600)
        (base / "bundle.pem").write_text(ca("bundle", "show", data_dir=ca_dir))

        api_config = sidecar_config(api_dir, "api-1", agent, enroll, api_status)
        api_config["inbound"] = [
            {
                "name": "api",
                "listen": f"127.0.0.1:{api_inbound}",
                "forward": f"127.0.0.1:{api_app}",
                "identity": API_ID,
                "allow": [WEB_ID],
                "proxy_protocol": True,
            }
        ]
        web_config = sidecar_config(web_dir, "web-1", agent, enroll, web_status)
        web_config["outbound"] = [
            {
                "name": "api",
                "listen": f"127.0.0.1:{web_outbound}",
                "connect": f"127.0.0.1:{api_inbound}",
                "identity": WEB_ID,
                "expect": API_ID,
            }
        ]
        configs = {}
        for name, directory, document in (
            ("web-1", web_dir, web_config),
            ("api-1", api_dir, api_config),
        ):
            configs[name] = directory / "sidecar.yaml"
            configs[name].write_text(json.dumps(document, indent=2))
        step("starting both sidecars; each enrolls with its token (keys never leave them)")
        for name in ("api-1", "web-1"):
            procs.append(
                subprocess.Popen(
                    [
                        BIN / "meshtls-sidecar",
                        "run",
                        "--config",
                        configs[name],
                        "--log-level",
                        "warning",
                    ],
                    env=env,
                )
            )
        for port in (api_status, web_status):
            wait_for(
                "both sidecars to hold their identities",
                lambda port=port: sidecar_status(port).get("ready") is True,  # type: ignore[misc]
                procs=procs,
            )
        for name in ("web-1", "api-1"):
            step(f"sidecar {name}")
            subprocess.run(
                [str(BIN / "meshtls-sidecar"), "status", "--config", str(configs[name])],
                check=True,
            )

        step(f"starting the api service on 127.0.0.1:{api_app} (plaintext, behind api-1)")
        procs.append(subprocess.Popen([*APPS, "api", str(api_app)], env=env))
        wait_for("the api service", lambda: listening(api_app), procs=procs)
        wait_for("the outbound listener", lambda: listening(web_outbound), procs=procs)

        step(f"what the protected port 127.0.0.1:{api_inbound} refuses")
        print(f"    plaintext HTTP client:                 {plaintext_client(api_inbound)}")
        foreign = foreign_ca_client(api_inbound, WEB_ID)
        print(f"    client with another CA's certificate:  {foreign}")
        wait_for("the refusals to be counted", lambda: len(refusals(api_status)) >= 2)
        counted = ", ".join(f"{k}={v:.0f}" for k, v in sorted(refusals(api_status).items()))
        print(f"    api-1 counted refusals by reason:      {counted}")

        url = f"http://127.0.0.1:{web_outbound}/"
        step(f"starting the web service: GET {url} every {args.interval}s through web-1")
        web = subprocess.Popen(
            [*APPS, "web", url, str(args.interval)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(web)
        traffic = Traffic(web)
        if not args.once:
            step("running; identities rotate every few seconds; Ctrl-C stops everything")
        seen = {**serials(web_status), **serials(api_status)}
        rotated: dict[str, int] = dict.fromkeys(seen, 0)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        deadline = time.monotonic() + 120
        try:
            while all(proc.poll() is None for proc in procs):
                time.sleep(0.25)
                now = {**serials(web_status), **serials(api_status)}
                for spiffe_id, serial in now.items():
                    if seen.get(spiffe_id) != serial:
                        rotated[spiffe_id] = rotated.get(spiffe_id, 0) + 1
                        print(
                            f"    rotation: {spiffe_id} now serial {serial[:16]}... "
                            f"(was {seen.get(spiffe_id, '-')[:16]}...)"
                        )
                seen = now
                if args.once and min(rotated.values()) >= 1 and traffic.ok >= 5:
                    break
                if args.once and time.monotonic() > deadline:
                    print("    timed out waiting for both identities to rotate")
                    return 1
            else:
                print("    a process exited unexpectedly; see the log above")
                return 1
        except KeyboardInterrupt:
            pass
        step(
            f"summary: {traffic.ok + traffic.failed} requests, {traffic.failed} failed, "
            f"{sum(rotated.values())} identity rotations under traffic"
        )
        return 0 if traffic.failed == 0 else 1
    finally:
        step("stopping")
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
