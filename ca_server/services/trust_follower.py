"""Keeping this replica's keyring and trust snapshot in step with the database, including
changes another replica committed.

`TrustFollower.reload` rebuilds the keyring (its signer fenced by `SigningFence`) and the
trust snapshot from the authority journal and the revocations, and publishes them.

Following other replicas: every change of authorities or revocations bumps the bundle
version and (on PostgreSQL) NOTIFYs in the same transaction. `nudge()` (called by the
LISTEN connection, `services.cluster_events`) makes `follow_forever` reload at once. The
fallback is the signing fence's heartbeat thread (`services.signing_fence`), which reads
the database every `trust_poll_interval / 4`, nudges on any change, and keeps the signer
usable only while it is confirmed the active authority within `trust_poll_interval`
(at least 1 s). The same read hands the access version to `access_version_read`, which
drops the node and entry answers cached before another replica's ban or entry change."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ca_server.authority.kek import Kek
from ca_server.authority.keyring import Keyring
from ca_server.authority.rotation import bundle_root_ids
from ca_server.db.tx import Tx
from ca_server.domain import Authority
from ca_server.errors import CAError
from ca_server.services.context import CAContext
from ca_server.services.signing_fence import FencedSigner, FenceHeartbeat, SigningFence

log = logging.getLogger(__name__)

# The fence's heartbeat reads the database this many times per trust_poll_interval, so a
# read may be late by up to 3/4 of the interval before the signing fence closes.
CONFIRMS_PER_INTERVAL = 4
# A shorter poll interval polls faster but does not tighten the fence below this: on a
# loaded host a read can take a few hundred milliseconds without anything being wrong.
MIN_FENCE_SECONDS = 1.0

T = TypeVar("T")


class TrustFollower:
    """Builds and publishes this process's keyring and trust snapshot, and follows the
    database for changes made elsewhere. Create inside the event loop that will use it."""

    def __init__(
        self,
        ctx: CAContext,
        kek: Kek,
        retired_grace: float,
        on_roots_changed: Callable[[bytes], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx = ctx
        self._kek = kek
        self._retired_grace = retired_grace
        self._on_roots_changed = on_roots_changed
        self.fence = SigningFence(max(ctx.config.trust_poll_interval, MIN_FENCE_SECONDS), monotonic)
        self._nudged = asyncio.Event()
        # The follow loop's reads get their own thread, so a busy default executor (a
        # renewal storm) cannot delay the fence's heartbeat.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trust-follow")
        self._stopped = False

    def build_keyring(
        self, authorities: list[Authority], last_leaf_expiry: dict[str, float]
    ) -> Keyring:
        ids = bundle_root_ids(
            authorities, self._ctx.clock.now(), last_leaf_expiry, self._retired_grace
        )
        keyring = Keyring.from_authorities(authorities, self._kek, bundle_root_ids=ids)
        signer = FencedSigner.wrap(
            keyring.signer, keyring.active_intermediate, self._kek, self.fence
        )
        return dataclasses.replace(keyring, signer=signer)

    async def _read(self, fn: Callable[[Tx], T]) -> T:
        if self._stopped:  # stopping: the shared executor still serves the last reads
            return await self._ctx.read(fn)

        def run() -> T:
            with self._ctx.store.read() as tx:
                return fn(tx)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def reload(self) -> None:
        """Rebuild the keyring and the trust snapshot from the database and publish them."""
        ctx = self._ctx
        now = ctx.clock.now()
        started = self.fence.mark()

        def load(tx: Tx) -> tuple[int, list[Authority], dict[str, float], list]:  # type: ignore[type-arg]
            return (
                tx.bundle_version(),
                tx.list_authorities(),
                tx.latest_expiry_by_issuer(),
                tx.revoked_unexpired(now),
            )

        version, authorities, expiry, revoked = await self._read(load)
        old_roots = ctx.trust.snapshot.roots
        keyring = self.build_keyring(authorities, expiry)
        ctx.trust.publish(version, revoked, keyring)
        self.fence.confirm(started)
        ctx.metrics.revoked.set(len(revoked))
        ctx.auth_cache.clear()
        if keyring.roots != old_roots:
            log.info(
                "trust bundle changed",
                extra={
                    "version": version,
                    "roots": len(keyring.roots),
                    "signer": keyring.signer.authority_id,
                },
            )
            if self._on_roots_changed is not None:
                self._on_roots_changed(ctx.trust.snapshot.roots_pem)

    def access_version_read(self, version: int) -> None:
        """The database holds access version `version`: drop cached node and entry answers
        if another replica (or this one) changed a node or an entry since they were read."""
        self._ctx.auth_cache.advance(version)
        self._ctx.entries_cache.advance(version)

    def nudge(self, version: int | None = None) -> None:
        """Another replica announced trust-state `version` (None: unknown, check): reload
        at once unless this replica already holds it."""
        if version is None or version > self._ctx.trust.snapshot.version:
            self._nudged.set()

    def _held(self) -> tuple[int, str]:
        trust = self._ctx.trust
        return trust.snapshot.version, trust.keyring.signer.authority_id

    async def follow_forever(self, interval: float) -> None:
        """Pick up authorities and revocations another replica committed: at once when
        nudged (a NOTIFY, or the fence's heartbeat thread, which polls every
        `interval / CONFIRMS_PER_INTERVAL`), and by its own check every `interval`."""
        loop = asyncio.get_running_loop()
        heartbeat = FenceHeartbeat(
            self.fence,
            self._ctx.store,
            self._held,
            lambda: loop.call_soon_threadsafe(self._nudged.set),
            interval / CONFIRMS_PER_INTERVAL,
            lambda version: loop.call_soon_threadsafe(self.access_version_read, version),
        )
        heartbeat.start()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._nudged.wait(), interval)
                self._nudged.clear()
                try:
                    await self.check_version()
                except CAError as exc:
                    log.warning("trust state poll failed", extra={"reason": exc.message})
        finally:
            heartbeat.stop()

    async def check_version(self) -> None:
        """Reload when the database holds a newer trust state."""
        version = await self._read(lambda tx: tx.bundle_version())
        if version != self._ctx.trust.snapshot.version:
            await self.reload()

    def stop(self) -> None:
        """Release the follow loop's read thread; later reads use the shared executor."""
        self._stopped = True
        self._executor.shutdown(wait=False, cancel_futures=True)
