"""`meshtls-ca`: argument parsing and the single exit point of the CA's command line.

`serve`, `db upgrade` and `kek generate` act locally; every other command talks to the
running server through its admin API (the Unix socket in the data dir by default)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from ca_server import config as config_module
from ca_server.admin_commands import COMMANDS, AdminClient
from ca_server.errors import CAError, ConfigError
from meshtls import logs
from meshtls.event_loop import run as run_event_loop

log = logging.getLogger("meshtls.ca")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--data-dir", type=Path, help="state directory (default .meshtls/ca)")
    p.add_argument("--trust-domain")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the data dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshtls-ca", description="The meshtls certificate authority"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the CA")
    _server_flags(serve)
    serve.add_argument("--listen", help="agent listener HOST:PORT (mTLS), default 127.0.0.1:8443")
    serve.add_argument(
        "--enroll-listen", help="enrollment listener HOST:PORT (TLS), default 127.0.0.1:8444"
    )
    serve.add_argument("--http-listen", help="/healthz /readyz /metrics HOST:PORT or 'off'")
    serve.add_argument(
        "--health-listen", help="plaintext gRPC health port for probes HOST:PORT or 'off'"
    )
    serve.add_argument("--kek-file", type=Path, help="key-encryption key file (base64, mode 0600)")
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="development mode: generate a KEK in the data dir if none is given",
    )
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="refuse to start on pending migrations instead of applying them",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serving processes sharing the listeners (SO_REUSEPORT), each a replica on the "
        "same database; the first also holds the admin socket and HTTP endpoint",
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--log-format", choices=["text", "json"], default="text")
    serve.add_argument("--log-level", default="info")

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", help="apply pending schema migrations")
    _server_flags(upgrade)

    kek = sub.add_parser("kek", help="key-encryption key")
    kek_sub = kek.add_subparsers(dest="kek_command", required=True, metavar="ACTION")
    gen = kek_sub.add_parser("generate", help="write a new random KEK file (mode 0600)")
    gen.add_argument("path", type=Path)

    for name, spec in COMMANDS.items():
        spec.register(sub, name)
    return parser


def _config_from(args: argparse.Namespace) -> config_module.CAConfig:
    overrides: dict[str, Any] = {
        "data_dir": getattr(args, "data_dir", None),
        "trust_domain": getattr(args, "trust_domain", None),
        "database_url": getattr(args, "database_url", None),
        "listen": getattr(args, "listen", None),
        "enroll_listen": getattr(args, "enroll_listen", None),
        "http_listen": getattr(args, "http_listen", None),
        "health_listen": getattr(args, "health_listen", None),
        "kek_file": getattr(args, "kek_file", None),
        "dev": getattr(args, "dev", None),
    }
    if getattr(args, "no_migrate", False):
        overrides["migrate_on_start"] = False
    return config_module.load(file=args.config, overrides=overrides)


def _freeze_startup_heap() -> None:
    """Move everything allocated while starting (modules, schema, gRPC and protobuf
    descriptors, keys) out of the garbage collector's reach. A full collection otherwise
    walks all of it and stalls the event loop for ~50 ms each time, which every request in
    flight sees; after this it walks only what serving allocated (~1 ms)."""
    gc.collect()
    gc.freeze()


async def _serve(config: config_module.CAConfig, workers: int, worker: bool) -> None:
    from ca_server.app import CAServer
    from ca_server.workers import WorkerPool

    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if workers > 1 and (config.listen.port == 0 or config.enroll_listen.port == 0):
        raise ConfigError("--workers needs fixed ports for --listen and --enroll-listen")
    server = CAServer(config, share_ports=workers > 1, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    _freeze_startup_heap()
    pool = WorkerPool(workers - 1)
    try:
        pool.start()
        await stop.wait()
        log.info("shutting down")
    finally:
        await pool.stop()
        await server.stop()


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        logs.configure(args.log_format, args.log_level)
        # Alembic narrates every start at INFO; our own log line says what was applied.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        config = _config_from(args)
        run_event_loop(_serve(config, args.workers, args.worker))
        return EXIT_OK
    if args.command == "db":
        from ca_server.db import migrate

        logs.configure("text", "info")
        config = _config_from(args)
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        applied = migrate.upgrade(config.effective_database_url)
        print(
            f"applied {len(applied)} migration(s)"
            + (f": {', '.join(applied)}" if applied else "; the database is up to date")
        )
        return EXIT_OK
    if args.command == "kek":
        from ca_server.authority.kek import generate_kek_file

        generate_kek_file(args.path)
        print(
            f"wrote a new key-encryption key to {args.path} (mode 0600); keep a copy safe: "
            "without it the CA keys in the database cannot be read"
        )
        return EXIT_OK
    spec = COMMANDS[args.command]
    with AdminClient.connect(args) as client:
        return spec.run(client, args)


def main(argv: Sequence[str] | None = None) -> int:
    """The single exit point: every failure becomes one clear line and an exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"meshtls-ca: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CAError as exc:
        print(f"meshtls-ca: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            print(
                f"meshtls-ca: cannot reach the CA ({details}); is `meshtls-ca serve` running "
                "with this --data-dir / --admin-socket?",
                file=sys.stderr,
            )
        else:
            print(f"meshtls-ca: {details} [{code.name if code else 'error'}]", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"meshtls-ca: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return EXIT_OK
    except OSError as exc:
        print(f"meshtls-ca: {exc}", file=sys.stderr)
        return EXIT_FAILED
