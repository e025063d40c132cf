"""Command line: `meshtls-sidecar run --config FILE`, `meshtls-sidecar status` and
`meshtls-sidecar fetch` (one identity's files, once: sidecar/fetch.py).

`main()` is the single exit point. Exit codes: 0 success (for `status`: ready); 1 the
sidecar is not ready (`status`), a background task failed (`run`) or the identity could not
be obtained (`fetch`); 2 a startup or usage error, printed as one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshtls.event_loop import run as run_event_loop
from meshtls.logs import configure as configure_logging
from sidecar import fetch
from sidecar.app import SidecarApp
from sidecar.config import SidecarConfig, load_config
from sidecar.errors import SidecarError
from sidecar.fields import Address, parse_address

PROG = "meshtls-sidecar"
EXIT_OK, EXIT_NOT_READY, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A startup or usage problem: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="meshtls host sidecar: keeps this node's X509-SVIDs fresh"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sidecar until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, type=Path, help="YAML config file")
    run.add_argument("--log-format", choices=["text", "json"], default="text")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    status = sub.add_parser("status", help="show the status of a running sidecar")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="read status.listen from this config")
    where.add_argument("--address", help="HOST:PORT of the status server")
    status.add_argument("--json", action="store_true", help="print the raw JSON document")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    fetch.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry point; the only place the process exits."""
    args = _parser().parse_args(argv)
    try:
        commands = {"run": _run, "status": _status, "fetch": fetch.command}
        code = commands[args.command](args)
    except (UsageError, SidecarError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = EXIT_OK
    sys.exit(code)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(args.log_format, args.log_level)
    return run_event_loop(_serve(config))


async def _serve(config: SidecarConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    app = SidecarApp(config)

    def on_stop() -> None:
        if stop.is_set():
            app.proxy.abort()  # a second signal: stop waiting for open connections
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, app.request_reload)
    try:
        await app.run_until(stop)
    except OSError as exc:
        raise UsageError(
            f"cannot start: {exc.strerror or exc} (is status.listen "
            f"{config.status.listen} or a proxy listener's address already in use?)"
        ) from None
    except RuntimeError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NOT_READY
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    if args.address is not None:
        try:
            address = parse_address(args.address)
        except ValueError as exc:
            raise UsageError(f"--address: {exc}") from None
    else:
        address = load_config(args.config).status.listen
    doc = fetch_status(address, args.timeout)
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else format_status(doc))
    return EXIT_OK if doc.get("ready") else EXIT_NOT_READY


def fetch_status(address: Address, timeout: float) -> dict[str, Any]:
    host = "127.0.0.1" if address.host in {"0.0.0.0", ""} else address.host  # noqa: S104
    conn = http.client.HTTPConnection(host, address.port, timeout=timeout)
    try:
        conn.request("GET", "/status")
        reply = conn.getresponse()
        body = reply.read()
    except OSError as exc:
        raise UsageError(
            f"cannot reach the sidecar status server at {address}: {exc.strerror or exc}"
        ) from None
    finally:
        conn.close()
    try:
        doc = json.loads(body)
    except ValueError:
        raise UsageError(
            f"the server at {address} did not answer with a status document (HTTP {reply.status})"
        ) from None
    if not isinstance(doc, dict):
        raise UsageError(f"the server at {address} answered an unexpected document")
    return doc


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds <= 0:
        return "expired"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


def format_status(doc: dict[str, Any]) -> str:
    """A human summary of a /status document."""
    lines: list[str] = []
    ready = "yes" if doc.get("ready") else f"NO - {doc.get('reason')}"
    lines.append(f"ready:    {ready}")
    if doc.get("problem"):
        lines.append(f"problem:  {doc['problem']}")
    node = doc.get("node") or {}
    node_line = f"node:     {node.get('name')} ({node.get('spiffe_id')})"
    if node.get("serial"):
        node_line += (
            f" serial {node['serial'][:16]} expires in {_duration(node.get('expires_in_seconds'))}"
        )
    else:
        node_line += " - no certificate"
    lines.append(node_line)
    ca = doc.get("ca") or {}
    reach = {True: "reachable", False: "UNREACHABLE", None: "not contacted yet"}.get(
        ca.get("reachable"), "?"
    )
    lines.append(f"ca:       {ca.get('address')} {reach}")
    err = doc.get("last_error")
    if err:
        lines.append(f"last err: {err.get('at')} {err.get('operation')}: {err.get('message')}")
    bundle = doc.get("bundle")
    if bundle:
        roots = len(bundle.get("roots_sha256", []))
        lines.append(f"bundle:   version {bundle.get('version')}, {roots} root(s)")
    rows = [("IDENTITY", "SERIAL", "EXPIRES IN", "LAST RENEWAL")]
    for ident in doc.get("identities") or []:
        rows.append(
            (
                str(ident.get("spiffe_id")),
                str(ident.get("serial", ""))[:16],
                _duration(ident.get("expires_in_seconds")),
                str(ident.get("last_renewal")),
            )
        )
    for pending in doc.get("pending_identities") or []:
        rows.append((str(pending), "-", "pending", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines.append("")
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    return "\n".join(lines)
