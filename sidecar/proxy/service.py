"""The proxy service: owns the listeners, follows identity snapshots, reloads and drains.

* Snapshots: every snapshot the identity manager publishes updates the TLS contexts at
  once (`TlsContexts.update`); new connections use the new identity, bundle and revoked
  serials, open connections keep what they started with.
* Reload (SIGHUP): the new listener set is applied all-or-nothing. Listeners whose name
  and address are unchanged take the new settings in place (a renamed listener on the same
  address too); new addresses are bound first, and if any bind fails every new socket is
  closed again and `ReloadError` leaves the old set running. Removed listeners stop
  accepting and drain in the background.
* Drain (SIGTERM): every listener stops accepting and lets its connections finish, up to
  its drain timeout; `abort()` (a second SIGTERM) closes what is left at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import AsyncIterator, Iterator
from typing import Literal, Protocol

from meshtls.clock import Clock, SystemClock
from sidecar.errors import SidecarError
from sidecar.identity.model import Snapshot
from sidecar.proxy import native_tls
from sidecar.proxy.config import InboundConfig, OutboundConfig, ProxyConfig
from sidecar.proxy.inbound import InboundListener
from sidecar.proxy.listener import Listener
from sidecar.proxy.metrics import ListenerStats, ProxyMetrics
from sidecar.proxy.native_tls import NativeTls
from sidecar.proxy.outbound import OutboundListener
from sidecar.proxy.tls import ContextKey, TlsContexts

log = logging.getLogger("sidecar.proxy")


class ReloadError(SidecarError):
    """A new proxy configuration could not be applied; the old one keeps running."""


class Subscription(Protocol):
    def __aiter__(self) -> AsyncIterator[Snapshot]: ...

    async def __anext__(self) -> Snapshot: ...

    def close(self) -> None: ...


class SnapshotSource(Protocol):
    """The identity manager, or any snapshot publisher: the current snapshot at once,
    then the newest after every change."""

    def subscribe(self) -> Subscription: ...


def wanted_contexts(config: ProxyConfig) -> set[ContextKey]:
    keys = {ContextKey(c.identity, "server", c.min_tls_version) for c in config.inbound}
    keys |= {ContextKey(c.identity, "client", c.min_tls_version) for c in config.outbound}
    return keys


def raise_fd_limit() -> None:
    """Lift the soft limit on open files to the hard one: each connection takes two."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit", extra={"error": str(exc)})
        return
    log.info("raised the open-files limit", extra={"from": soft, "to": target})


def _warn_unsafe(config: ProxyConfig) -> None:
    for inbound in config.inbound:
        if inbound.unsafe_forward:
            log.warning(
                "UNSAFE: inbound listener %s forwards PLAINTEXT to %s, off this host "
                "(unsafe_forward: true); anyone on that path can read and change the traffic",
                inbound.name,
                inbound.forward,
                extra={"listener": inbound.name, "forward": str(inbound.forward)},
            )
    for outbound in config.outbound:
        if outbound.unsafe_listen:
            log.warning(
                "UNSAFE: outbound listener %s takes plaintext on %s, beyond loopback "
                "(unsafe_listen: true); whoever reaches it speaks as %s",
                outbound.name,
                outbound.listen,
                outbound.identity,
                extra={"listener": outbound.name, "listen": str(outbound.listen)},
            )


class ProxyService:
    def __init__(
        self,
        config: ProxyConfig,
        *,
        metrics: ProxyMetrics,
        clock: Clock | None = None,
        native: NativeTls | Literal["auto"] | None = "auto",
    ) -> None:
        self.config = config
        self.metrics = metrics
        # TLS checks validity against real time (OpenSSL does), so should the proxy.
        self.clock: Clock = clock or SystemClock()
        # The native TLS helpers when they work here ("auto"), or None: Python's defaults.
        self.tls = TlsContexts(native_tls.load() if native == "auto" else native)
        self.listeners: dict[str, Listener] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: set[Listener] = set()
        self._snapshot: Snapshot | None = None
        self._subscription: Subscription | None = None
        self._follower: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        metrics.watch(self._stats)

    # -- start and snapshots ---------------------------------------------------------

    async def start(self, source: SnapshotSource) -> None:
        """Build the contexts from the current snapshot, bind every listener, follow."""
        subscription = source.subscribe()
        self.apply_snapshot(await subscription.__anext__())
        if self.config.listeners:
            raise_fd_limit()
        _warn_unsafe(self.config)
        try:
            self.listeners = await self._bind(self.config.listeners)
        except BaseException:
            subscription.close()
            raise
        self._subscription = subscription
        self._follower = asyncio.create_task(self._follow(subscription), name="proxy-tls")

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self.tls.update(snapshot, wanted_contexts(self.config))
        now = asyncio.get_running_loop().time()
        for listener in self.listeners.values():
            listener.sweep_extra(now)

    async def _follow(self, subscription: Subscription) -> None:
        async for snapshot in subscription:
            self.apply_snapshot(snapshot)

    async def _bind(
        self, configs: tuple[InboundConfig | OutboundConfig, ...]
    ) -> dict[str, Listener]:
        bound: dict[str, Listener] = {}
        try:
            for cfg in configs:
                listener: Listener = (
                    InboundListener(cfg, self)
                    if isinstance(cfg, InboundConfig)
                    else OutboundListener(cfg, self)
                )
                await listener.start()
                bound[cfg.name] = listener
        except OSError:
            for listener in bound.values():
                await listener.close()
            raise
        return bound

    # -- reload ----------------------------------------------------------------------

    async def reload(self, new: ProxyConfig) -> None:
        """Apply a new listener set, or raise ReloadError and change nothing."""
        async with self._reload_lock:
            await self._reload(new)

    async def _reload(self, new: ProxyConfig) -> None:
        new_names = {c.name for c in new.listeners}
        keep: list[tuple[Listener, InboundConfig | OutboundConfig]] = []
        fresh: list[InboundConfig | OutboundConfig] = []
        taken: set[str] = set()
        for cfg in new.listeners:
            old = self._match(cfg, new_names, taken)
            if old is None:
                fresh.append(cfg)
            else:
                taken.add(old.name)
                keep.append((old, cfg))
        if self._snapshot is not None:
            # Keep the contexts of the running listeners until the switch below.
            self.tls.update(self._snapshot, wanted_contexts(self.config) | wanted_contexts(new))
        try:
            bound = await self._bind(tuple(fresh))
        except OSError as exc:
            raise ReloadError(
                f"cannot apply the new proxy listeners: {exc.strerror or exc}"
            ) from None
        retire = [listener for name, listener in self.listeners.items() if name not in taken]
        listeners: dict[str, Listener] = {}
        for old, cfg in keep:
            old.reconfigure(cfg)
            listeners[cfg.name] = old
        listeners.update(bound)
        self.listeners = {c.name: listeners[c.name] for c in new.listeners}
        self.config = new
        if self._snapshot is not None:
            self.tls.update(self._snapshot, wanted_contexts(new))
        _warn_unsafe(new)
        for listener in retire:
            self._retire(listener)
        log.info(
            "proxy configuration reloaded",
            extra={
                "kept": [c.name for _, c in keep],
                "added": [c.name for c in fresh],
                "removed": [listener.name for listener in retire],
            },
        )

    def _match(
        self, cfg: InboundConfig | OutboundConfig, new_names: set[str], taken: set[str]
    ) -> Listener | None:
        kind = InboundListener if isinstance(cfg, InboundConfig) else OutboundListener

        def same_address(listener: Listener) -> bool:
            # As configured, or as bound (a port 0 listener now has a real port).
            return cfg.listen in (listener.config.listen, listener.bound)

        old = self.listeners.get(cfg.name)
        if old is not None and isinstance(old, kind) and same_address(old):
            return old
        if cfg.listen.port == 0:
            return None
        for listener in self.listeners.values():  # renamed, same address
            if (
                listener.name not in new_names
                and listener.name not in taken
                and isinstance(listener, kind)
                and same_address(listener)
            ):
                return listener
        return None

    def _retire(self, listener: Listener) -> None:
        self._retired.add(listener)

        async def drain() -> None:
            try:
                await listener.drain()
            finally:
                self._retired.discard(listener)

        task = asyncio.create_task(drain(), name=f"proxy-retire-{listener.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- shutdown --------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop accepting everywhere and wait for open connections (drain timeouts)."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        listeners = list(self.listeners.values())
        for listener in listeners:
            listener.stop_accepting()
        await asyncio.gather(*(listener.drain() for listener in listeners), *self._retiring)
        self.listeners = {}

    def abort(self) -> None:
        """Close every open connection now (a second SIGTERM during a drain)."""
        for listener in self.all_listeners():
            listener.stop_accepting()
            listener.abort_all("aborted")

    def all_listeners(self) -> Iterator[Listener]:
        yield from self.listeners.values()
        yield from self._retired

    def _stats(self) -> Iterator[ListenerStats]:
        for listener in self.all_listeners():
            yield listener.stats()
