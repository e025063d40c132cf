"""`make run`: a CA and a sidecar on this machine (SQLite, loopback), the sidecar enrolled
with a one-time token, and the identities it holds printed with their expiry.

Everything lives in ./.meshtls/quickstart (removed at each start). The CA runs with --dev,
which generates a throwaway key-encryption key: never do that in production.
Ctrl-C stops both processes; --once stops them after printing.
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
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRUST_DOMAIN = "example.org"
NODE = "web-1"
IDENTITIES = [
    ("spiffe://example.org/svc/web", ["web.internal"]),
    ("spiffe://example.org/svc/api", []),
]


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


def wait_for(what: str, check, timeout: float = 30.0, procs=()) -> None:  # type: ignore[no-untyped-def]
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


def sidecar_status(port: int) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--once", action="store_true", help="stop after printing the identities")
    parser.add_argument("--dir", type=Path, default=ROOT / ".meshtls" / "quickstart")
    args = parser.parse_args()

    base: Path = args.dir
    shutil.rmtree(base, ignore_errors=True)
    ca_dir, sidecar_dir = base / "ca", base / "sidecar"
    sidecar_dir.mkdir(parents=True, mode=0o700)
    agent_port, enroll_port, status_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
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
                    f"127.0.0.1:{agent_port}",
                    "--enroll-listen",
                    f"127.0.0.1:{enroll_port}",
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

        step(f"registering identities for node {NODE} and creating a join token")
        for spiffe_id, dns in IDENTITIES:
            extra = [a for name in dns for a in ("--dns", name)]
            ca(
                "entry",
                "create",
                "--spiffe-id",
                spiffe_id,
                "--node",
                NODE,
                "--ttl",
                "1h",
                *extra,
                data_dir=ca_dir,
            )
        token = ca("token", "create", "--node", NODE, data_dir=ca_dir).strip()
        (sidecar_dir / "token").write_text(token + "\n")
        os.chmod(sidecar_dir / "token", 0o600)
        (sidecar_dir / "bundle.pem").write_text(ca("bundle", "show", data_dir=ca_dir))

        config = sidecar_dir / "sidecar.yaml"
        config.write_text(
            json.dumps(
                {
                    "trust_domain": TRUST_DOMAIN,
                    "node": NODE,
                    "state_dir": str(sidecar_dir / "state"),
                    "ca": {
                        "address": f"127.0.0.1:{agent_port}",
                        "enroll_address": f"127.0.0.1:{enroll_port}",
                        "trust_bundle": str(sidecar_dir / "bundle.pem"),
                        "join_token_file": str(sidecar_dir / "token"),
                    },
                    "files": [
                        {"spiffe_id": IDENTITIES[0][0], "dir": str(sidecar_dir / "files" / "web")}
                    ],
                    "status": {"listen": f"127.0.0.1:{status_port}"},
                },
                indent=2,
            )
        )
        step("starting the sidecar; it enrolls with the token (its keys never leave it)")
        procs.append(
            subprocess.Popen(
                [BIN / "meshtls-sidecar", "run", "--config", config, "--log-level", "warning"],
                env=env,
            )
        )
        wait_for(
            "the sidecar to hold every identity",
            lambda: sidecar_status(status_port).get("ready") is True,
            procs=procs,
        )

        step("identities held by the sidecar")
        subprocess.run(
            [str(BIN / "meshtls-sidecar"), "status", "--config", str(config)], check=True
        )
        step(
            f"files for {IDENTITIES[0][0]} in {sidecar_dir / 'files' / 'web'}: "
            + ", ".join(sorted(p.name for p in (sidecar_dir / "files" / "web").iterdir()))
        )
        step("what the CA recorded")
        print(ca("cert", "list", data_dir=ca_dir), end="")
        if args.once:
            return 0
        step("running; Ctrl-C stops both processes")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while all(proc.poll() is None for proc in procs):
                time.sleep(0.5)
        except KeyboardInterrupt:
            step("stopping")
            return 0
        return 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
