"""A real, throwaway PostgreSQL server for the test session.

`start_postgres()` runs initdb into a temporary directory and starts ``postgres`` on
127.0.0.1 with a free port (plus a unix socket in the same directory), trust
authentication and durability switched off for speed. PostgreSQL refuses to run as root,
so under root it runs as the ``postgres`` system user (created by the Debian package).
Each test gets its own database from `PostgresServer.create_database()`.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

# Names the directory of initdb/postgres/pg_ctl explicitly (e.g. to pick one version).
BIN_DIR_ENV = "MESHTLS_POSTGRES_BIN_DIR"
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, postgres, pg_ctl) were not found "
    f"(${BIN_DIR_ENV}, PATH, /usr/lib/postgresql/*/bin): run scripts/system-deps.sh "
    "to install them"
)
TOOLS = ("initdb", "postgres", "pg_ctl")
STARTUP_TIMEOUT = 60.0
SUPERUSER = "postgres"


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be started here (missing binaries or system user)."""


def find_bin_dir() -> Path | None:
    """The directory holding initdb/postgres/pg_ctl: $MESHTLS_POSTGRES_BIN_DIR if set,
    else PATH, else the newest Debian-style /usr/lib/postgresql/<version>/bin."""
    explicit = os.environ.get(BIN_DIR_ENV)
    if explicit:
        path = Path(explicit)
        return path if all((path / tool).is_file() for tool in TOOLS) else None
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl") and shutil.which("postgres"):
        return Path(on_path).resolve().parent

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if all((path / tool).is_file() for tool in TOOLS)
    ]
    return max(candidates, key=version) if candidates else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server. `admin_url` connects as the superuser to the `postgres` db."""

    bin_dir: Path
    base_dir: Path
    port: int
    run_as: str | None
    # False: fsync, synchronous commit and full-page writes off, small shared buffers (fast
    # tests); True: PostgreSQL's own defaults (benchmarks).
    durable: bool = False
    process: subprocess.Popen[bytes] | None = None
    databases: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def admin_url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect(
        self, database: str = "postgres", *, autocommit: bool = True
    ) -> psycopg.Connection[tuple[object, ...]]:
        """A plain psycopg connection as the superuser (a test's second session)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            autocommit=autocommit,
            connect_timeout=5,
        )

    def create_database(self) -> str:
        """Create a new, empty database and return its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        self.databases.append(name)
        return self.url_for(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by `create_database` (disconnecting its sessions)."""
        name = url.rsplit("/", 1)[1]
        if name not in self.databases:
            raise ValueError(f"{name!r} was not created by this server")
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        self.databases.remove(name)

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", self.run_as, "--", *command] if self.run_as else command

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            self._command(tool, *args), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{tool} failed (exit {result.returncode}): {result.stderr.strip()}"
            )

    def initdb(self) -> None:
        self._run(
            "initdb",
            "--pgdata",
            str(self.data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )

    def start(self) -> None:
        settings: list[tuple[str, str]] = [
            ("listen_addresses", "127.0.0.1"),
            ("port", str(self.port)),
            ("unix_socket_directories", str(self.socket_dir)),
            ("max_connections", "200"),
            ("log_min_messages", "warning"),
        ]
        if not self.durable:
            settings += [
                ("fsync", "off"),
                ("synchronous_commit", "off"),
                ("full_page_writes", "off"),
                ("shared_buffers", "32MB"),  # many test databases, little data each
            ]
        args = ["-D", str(self.data_dir)]
        for name, value in settings:
            args += ["-c", f"{name}={value}"]
        with self.log_file.open("ab") as log_output:
            self.process = subprocess.Popen(
                self._command("postgres", *args),
                stdout=log_output,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll with real connection attempts until the server answers."""
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        delay = 0.01
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited with {self.process.returncode} during startup:\n"
                    + self.log_text()
                )
            try:
                with self.connect() as conn:
                    conn.execute(b"SELECT 1")
                return
            except psycopg.OperationalError as error:
                last_error = error
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        raise PostgresUnavailable(
            f"postgres did not accept connections within {STARTUP_TIMEOUT:.0f} s "
            f"({last_error}):\n" + self.log_text()
        )

    def recycle_wal(self, segments: int = 64) -> None:
        """Bring the write-ahead log to the state of a server that has been running: switch
        through `segments` WAL segments, then checkpoint, which keeps them (up to
        max_wal_size, 1 GB by default) to be recycled. A fresh initdb has none, so under
        load it creates and zero-fills a new 16 MB segment every few seconds, and every
        commit waits behind that (tens of ms): a one-time cost of a new cluster that a
        benchmark would otherwise report as the CA's latency."""
        with self.connect() as conn:
            # A logged table (a TEMP one writes no WAL), left by no failed run before.
            conn.execute(b"DROP TABLE IF EXISTS meshtls_wal_filler")
            conn.execute(b"CREATE TABLE meshtls_wal_filler (x int)")
            for _ in range(segments):
                conn.execute(b"INSERT INTO meshtls_wal_filler VALUES (1)")  # a switch needs WAL
                conn.execute(b"SELECT pg_switch_wal()")
            conn.execute(b"DROP TABLE meshtls_wal_filler")
            conn.execute(b"CHECKPOINT")

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        """Stop the server (immediate shutdown: the data is thrown away) and delete it."""
        try:
            if self.process is not None and self.process.poll() is None:
                self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _run_as_user() -> str | None:
    """None when we may run PostgreSQL ourselves; the system user to use under root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PostgresUnavailable(
            "running as root, and PostgreSQL refuses to run as root, but there is no "
            f"'{SUPERUSER}' system user to run it as: run scripts/system-deps.sh "
            "(the Debian postgresql package creates it) or run the tests as a normal user"
        ) from None
    if shutil.which("runuser") is None:
        raise PostgresUnavailable(
            "running as root needs `runuser` (util-linux) to start PostgreSQL"
        )
    return SUPERUSER


def start_postgres(attempts: int = 3, *, durable: bool = False) -> PostgresServer:
    """initdb + start a server; retries on a fresh port if the chosen one was taken.
    Tests run without fsync; `durable` keeps PostgreSQL's defaults (benchmarks, which
    also call `recycle_wal`)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable(INSTALL_HINT)
    run_as = _run_as_user()
    base_dir = Path(tempfile.mkdtemp(prefix="meshtls-pg-"))
    if run_as is not None:
        user = pwd.getpwnam(run_as)
        os.chown(base_dir, user.pw_uid, user.pw_gid)
    server = PostgresServer(
        bin_dir=bin_dir, base_dir=base_dir, port=free_port(), run_as=run_as, durable=durable
    )
    try:
        server.initdb()
        server.socket_dir.mkdir()
        if run_as is not None:
            user = pwd.getpwnam(run_as)
            os.chown(server.socket_dir, user.pw_uid, user.pw_gid)
        for attempt in range(1, attempts + 1):
            try:
                server.start()
                break
            except PostgresUnavailable:
                if attempt == attempts or "could not bind" not in server.log_text():
                    raise
                server.port = free_port()
        log.info("postgres started", extra={"port": server.port, "bin_dir": str(bin_dir)})
        return server
    except BaseException:
        server.stop()
        raise
