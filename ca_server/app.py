"""Composition root: builds the CA from its config and starts/stops it in order.

start: data dir -> KEK -> database (migrations) -> authorities (bootstrap on first start)
-> keyring -> group-commit writer -> the CA's own server certificate -> gRPC servers.
stop: health NOT_SERVING -> servers drain -> writer flushes -> database closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from apscheduler.schedulers.asyncio import AsyncIOScheduler

import meshtls
from ca_server.api.admin import AdminServicer, ServerInfo, spiffe_id_admin, unix_socket_admin
from ca_server.api.agent import AgentServicer
from ca_server.api.health_port import ProbeHealthServicer, build_health_port
from ca_server.api.http import build_status_server
from ca_server.api.server import (
    ADMIN_SERVICE,
    AGENT_SERVICE,
    build_admin_server,
    build_main_server,
    mark_serving,
)
from ca_server.attestation.k8s import KubernetesAttestor
from ca_server.authority.kek import Kek, generate_kek_file, load_kek_env, load_kek_file
from ca_server.authority.keyring import Keyring
from ca_server.authority.material import bootstrap_authorities
from ca_server.authority.rotation import RotationSettings
from ca_server.authority.upstream import load_upstream
from ca_server.config import KEK_ENV, CAConfig
from ca_server.db import migrate
from ca_server.db.notify import supports_notify
from ca_server.db.session import make_engine, redact_url
from ca_server.db.store import Store
from ca_server.domain import Authority
from ca_server.errors import ConfigError
from ca_server.metrics import CAMetrics
from ca_server.server_identity import ServerIdentity
from ca_server.services.audit import event, log_committed
from ca_server.services.authorities import AuthorityManager
from ca_server.services.cache import AccessCache
from ca_server.services.cluster_events import TrustChangeListener
from ca_server.services.context import CAContext
from ca_server.services.crl import CrlCache
from ca_server.services.jobs import instrumented, watch_expiry
from ca_server.services.pruning import prune
from ca_server.services.ratelimit import RateLimiter
from ca_server.services.trust import TrustState
from ca_server.services.writer import Writer, open_writer
from meshtls.clock import Clock, SystemClock, utc
from meshtls.statushttp import StatusServer

log = logging.getLogger(__name__)

# The longest a node's authentication and entry list are served from memory. Local bans,
# revocations and entry changes clear them at once; another replica's as soon as this one
# learns the newer access version (the signing fence's heartbeat reads it every
# trust_poll_interval / 4: 0.25 s by default). This bound is for when that never happens.
AUTH_CACHE_SECONDS = 30.0


class _CreatedElsewhere(Exception):
    """Rolls back a first-start transaction that lost the race to another replica."""

    def __init__(self, authorities: list[Authority]) -> None:
        super().__init__("authorities created by another replica")
        self.authorities = authorities


def resolve_kek(config: CAConfig, environ: dict[str, str] | None = None) -> Kek:
    """The KEK from --kek-file, else $MESHTLS_CA_KEK, else (only with --dev) a generated one."""
    env = os.environ if environ is None else environ
    if config.kek_file is not None:
        return load_kek_file(config.kek_file)
    if env.get(KEK_ENV):
        return load_kek_env(env[KEK_ENV])
    if config.dev:
        path = config.dev_kek_path
        if not path.exists():
            generate_kek_file(path)
            log.warning(
                "DEV MODE: generated a key-encryption key at %s. Anyone who can read this file "
                "and the database can read the CA keys. Never use --dev in production: pass "
                "--kek-file or set %s",
                path,
                KEK_ENV,
                extra={"kek_file": str(path)},
            )
        else:
            log.warning("DEV MODE: using the development KEK at %s", path)
        return load_kek_file(path)
    raise ConfigError(
        "no key-encryption key: pass --kek-file FILE (32 random bytes, base64, mode 0600; "
        "create one with `meshtls-ca kek generate FILE`) or set "
        f"{KEK_ENV}; for a throwaway setup use --dev"
    )


@dataclass
class BoundAddresses:
    agent: str
    enrollment: str
    admin_socket: Path
    http: str | None = None  # "host:port" of /healthz /readyz /metrics, when enabled


class CAServer:
    def __init__(
        self,
        config: CAConfig,
        *,
        clock: Clock | None = None,
        share_ports: bool = False,
        worker: bool = False,
    ) -> None:
        """`share_ports`: bind the gRPC ports with SO_REUSEPORT (with `--workers`).
        `worker`: an extra serving process of a `--workers` CA: no admin socket and no
        HTTP endpoint (the first process has them); otherwise a full replica."""
        self.config = config
        self._share_ports = share_ports or worker
        self._worker = worker
        self.clock = clock or SystemClock()
        self.metrics = CAMetrics()
        self.ctx: CAContext | None = None
        self.addresses: BoundAddresses | None = None
        self._servers: list[grpc.aio.Server] = []
        self._health: list = []  # type: ignore[type-arg]
        self._probe_health: ProbeHealthServicer | None = None
        self.health_port: int | None = None  # the gRPC probe port, when health_listen is set
        self._store: Store | None = None
        self._writer: Writer | None = None
        self._http: StatusServer | None = None
        self.server_identity: ServerIdentity | None = None
        self.authorities: AuthorityManager | None = None
        self.trust_listener: TrustChangeListener | None = None  # PostgreSQL only
        self._scheduler: AsyncIOScheduler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.kubernetes: KubernetesAttestor | None = None  # with a `kubernetes` config

    def _prepare_store(self) -> Store:
        url = self.config.effective_database_url
        engine = make_engine(url)
        if self.config.migrate_on_start:
            applied = migrate.upgrade(engine)
            if applied:
                log.info("applied database migrations", extra={"revisions": applied})
        else:
            pending = migrate.pending_revisions(url)
            if pending:
                raise ConfigError(
                    f"the database needs migrations {pending}: run `meshtls-ca db upgrade` "
                    "(or allow migrate_on_start)"
                )
        return Store(engine)

    def _load_authorities(self, store: Store, kek: Kek) -> list[Authority]:
        """The authorities in the database, or new ones on the very first start.

        Replicas started together on an empty database race to create them: the transaction
        that stores them first bumps the bundle version, which takes the single trust_state
        row's lock (PostgreSQL) or the write lock (SQLite) until commit, then looks again.
        The replica that finds authorities created meanwhile rolls back its own and uses
        those, so a cluster never starts with two roots of its own making.
        """
        with store.read() as tx:
            existing = tx.list_authorities()
        if existing:
            return existing
        now = self.clock.now()
        if self.config.upstream is not None:
            up = self.config.upstream
            created = load_upstream(up.cert_file, up.key_file, up.chain_file, kek, now)
        else:
            created = bootstrap_authorities(
                self.config.trust_domain,
                root_ttl=self.config.root_ttl,
                intermediate_ttl=self.config.intermediate_ttl,
                now=now,
                kek=kek,
            )
        events = [
            event(
                now,
                "system",
                "authority.create",
                a.id,
                kind=a.kind,
                state=a.state,
                fingerprint=a.fingerprint_sha256,
                upstream=a.upstream,
                not_after=utc(a.not_after).isoformat(),
            )
            for a in created
        ]
        try:
            with store.transaction() as tx:
                tx.bump_bundle_version()  # serialises replicas starting together (see above)
                existing = tx.list_authorities()
                if existing:
                    raise _CreatedElsewhere(existing)
                for authority in created:
                    tx.add_authority(authority)
                tx.add_audit_events(events)
        except _CreatedElsewhere as elsewhere:
            log.info("another replica created the authorities first; using them")
            return elsewhere.authorities
        log_committed(events)
        return created

    async def start(self) -> BoundAddresses:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kek = resolve_kek(config)
        if config.kubernetes is not None:  # fails fast on an unreadable CA file or token
            self.kubernetes = KubernetesAttestor.from_config(config.kubernetes)
        store = self._prepare_store()
        self._store = store
        authorities = self._load_authorities(store, kek)
        keyring = Keyring.from_authorities(authorities, kek)
        now = self.clock.now()
        with store.read() as tx:
            version = tx.bundle_version()
            revoked = tx.revoked_unexpired(now)
        trust = TrustState(keyring, version, revoked)
        writer = open_writer(store)
        writer.start()
        self._writer = writer
        ctx = CAContext(
            config=config,
            store=store,
            writer=writer,
            trust=trust,
            clock=self.clock,
            limiter=RateLimiter(
                config.rate_limit_per_node, config.rate_limit_burst, self.clock.now
            ),
            signing_limiter=RateLimiter(
                config.signing_rate_limit, int(2 * config.signing_rate_limit), self.clock.now
            ),
            metrics=self.metrics,
            auth_cache=AccessCache(AUTH_CACHE_SECONDS, self.clock.now),
            entries_cache=AccessCache(AUTH_CACHE_SECONDS, self.clock.now),
        )
        ctx.crl = CrlCache()
        self.ctx = ctx
        self.metrics.revoked.set(len(revoked))
        self.metrics.expiry_gauge(
            lambda: [
                (a.id, a.kind, a.state, a.not_after - self.clock.now())
                for a in ctx.trust.keyring.authorities
            ]
        )
        identity = ServerIdentity(ctx, config.server_cert_ttl)
        await identity.start()
        self.server_identity = identity
        self.authorities = AuthorityManager(
            ctx,
            kek,
            RotationSettings(
                intermediate_ttl=config.intermediate_ttl,
                root_ttl=config.root_ttl,
                retired_grace=config.retired_root_grace,
                min_propagation=config.rotation_min_propagation,
                lease=config.rotation_lease,
            ),
            on_roots_changed=identity.update_client_roots,
        )
        await self.authorities.reload()
        await self.authorities.tick()
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(
            instrumented(ctx, "rotation", self.authorities.tick),
            "interval",
            seconds=config.rotation_check_interval,
            id="rotation-check",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.add_job(
            instrumented(ctx, "expiry-watchdog", watch_expiry),
            "interval",
            args=[ctx, config.upstream_warning],
            seconds=600,
            id="expiry-watchdog",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.add_job(
            instrumented(ctx, "prune", prune),
            "interval",
            args=[ctx, config.certificate_retention],
            seconds=config.prune_interval,
            id="prune",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()
        await watch_expiry(ctx, config.upstream_warning)
        self._tasks.append(
            asyncio.create_task(
                self.authorities.follow_forever(config.trust_poll_interval), name="trust-follow"
            )
        )
        if supports_notify(config.effective_database_url):
            self.trust_listener = TrustChangeListener(
                config.effective_database_url, self.authorities.nudge
            )
            self._tasks.append(asyncio.create_task(self.trust_listener.run(), name="trust-listen"))
        assert identity.agent is not None
        assert identity.enrollment is not None

        info = ServerInfo(
            version=meshtls.__version__,
            started_at=now,
            agent_address="",
            enrollment_address="",
            database=redact_url(config.effective_database_url),
        )
        main, main_health = build_main_server(
            AgentServicer(ctx, kubernetes=self.kubernetes),
            AdminServicer(ctx, spiffe_id_admin(ctx), info, self.authorities),
            max_message_bytes=config.max_message_bytes,
            reuse_port=self._share_ports,
        )
        agent_port = main.add_secure_port(str(config.listen), identity.agent.credentials())
        enroll_port = main.add_secure_port(
            str(config.enroll_listen), identity.enrollment.credentials()
        )
        if not agent_port or not enroll_port:
            raise ConfigError(f"cannot listen on {config.listen} or {config.enroll_listen}")
        agent_address = f"{config.listen.host}:{agent_port}"
        enroll_address = f"{config.enroll_listen.host}:{enroll_port}"
        info.agent_address, info.enrollment_address = agent_address, enroll_address
        await main.start()
        self._servers, self._health = [main], [main_health]
        await mark_serving(main_health, [AGENT_SERVICE, ADMIN_SERVICE])
        if not self._worker:
            admin, admin_health = build_admin_server(
                AdminServicer(ctx, unix_socket_admin(ctx), info, self.authorities),
                config.admin_socket_path,
                max_message_bytes=config.max_message_bytes,
            )
            await admin.start()
            self._servers.append(admin)
            self._health.append(admin_health)
            await mark_serving(admin_health, [ADMIN_SERVICE])
        if config.health_listen is not None and not self._worker:
            probe, self._probe_health, probe_port = build_health_port(
                ctx, str(config.health_listen)
            )
            if not probe_port:
                raise ConfigError(f"cannot listen on health_listen {config.health_listen}")
            await probe.start()
            self._servers.append(probe)
            log.info(
                "gRPC health probe port serving",
                extra={"health_address": f"{config.health_listen.host}:{probe_port}"},
            )
            self.health_port = probe_port
        http_address = None
        if config.http_listen is not None and not self._worker:
            self._http = build_status_server(ctx, config.http_listen.host, config.http_listen.port)
            await self._http.start()
            host, port = self._http.address
            http_address = f"{host}:{port}"
        self.addresses = BoundAddresses(
            agent_address, enroll_address, config.admin_socket_path, http_address
        )
        log.info(
            "meshtls CA serving",
            extra={
                "trust_domain": config.trust_domain,
                "agent_address": agent_address,
                "enrollment_address": enroll_address,
                "admin_socket": str(config.admin_socket_path),
                "http_address": http_address,
                "database": info.database,
                "kek_id": kek.id,
            },
        )
        return self.addresses

    async def stop(self, grace: float = 5.0) -> None:
        if self._probe_health is not None:
            self._probe_health.stopping = True
            self._probe_health = None
        for health_servicer in self._health:
            await health_servicer.enter_graceful_shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self.authorities is not None:
            await self.authorities.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._http is not None:
            await self._http.stop()
            self._http = None
        for server in self._servers:
            await server.stop(grace)
        if self.server_identity is not None:
            await self.server_identity.stop()
            self.server_identity = None
        self._servers, self._health = [], []
        if self.kubernetes is not None:
            await self.kubernetes.close()
            self.kubernetes = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        if self._store is not None:
            await self._store.aclose()
            self._store = None
        log.info("meshtls CA stopped")
