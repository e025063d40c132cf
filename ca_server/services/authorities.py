"""The authority journal at run time: apply rotation plans (prepare, activate, retire),
import an operator's intermediate (upstream mode), and keep this process's keyring and
trust snapshot in step with the database, including changes made by another replica.

Following other replicas: every change of authorities or revocations bumps the bundle
version and (on PostgreSQL) NOTIFYs in the same transaction. `nudge()` (called by the
LISTEN connection, `services.cluster_events`) makes `follow_forever` reload at once. The
fallback is the signing fence's heartbeat thread (`services.signing_fence`), which reads
the database every `trust_poll_interval / 4`, nudges on any change, and keeps the signer
usable only while it is confirmed the active authority within `trust_poll_interval`
(at least 1 s)."""

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
from ca_server.authority.keys import decrypt_private_key
from ca_server.authority.material import new_generation, new_intermediate
from ca_server.authority.rotation import (
    Action,
    RotationSettings,
    bundle_root_ids,
    plan,
    prepared_intermediate,
)
from ca_server.authority.upstream_import import import_activation
from ca_server.db.notify import notify_trust_changed
from ca_server.db.tx import Tx
from ca_server.domain import Authority
from ca_server.errors import CAError, FailedPrecondition
from ca_server.services.audit import event
from ca_server.services.context import CAContext
from ca_server.services.signing_fence import FencedSigner, FenceHeartbeat, SigningFence
from meshtls.clock import utc
from meshtls.identity.x509 import fingerprint_sha256

log = logging.getLogger(__name__)

ROTATION_LEASE = "rotation"
# The fence's heartbeat reads the database this many times per trust_poll_interval, so a
# read may be late by up to 3/4 of the interval before the signing fence closes.
CONFIRMS_PER_INTERVAL = 4
# A shorter poll interval polls faster but does not tighten the fence below this: on a
# loaded host a read can take a few hundred milliseconds without anything being wrong.
MIN_FENCE_SECONDS = 1.0

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ImportResult:
    imported: Authority
    new_root: Authority | None
    authorities: list[Authority]
    activates_at: float | None  # None once it is the signer


class AuthorityManager:
    def __init__(
        self,
        ctx: CAContext,
        kek: Kek,
        settings: RotationSettings,
        on_roots_changed: Callable[[bytes], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx = ctx
        self._kek = kek
        self.settings = settings
        self._on_roots_changed = on_roots_changed
        self._lock = asyncio.Lock()
        self._requested = False
        self._pending_activation: asyncio.Task[None] | None = None
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
            authorities, self._ctx.clock.now(), last_leaf_expiry, self.settings.retired_grace
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

    async def tick(self, *, immediate: bool = False) -> list[Action]:
        """Apply what the rotation plan says is due now (and what an operator requested);
        return what was done."""
        async with self._lock:
            done: list[Action] = []
            if not await self._ctx.take_lease(ROTATION_LEASE, self.settings.lease):
                return done  # another replica runs rotation now
            for _ in range(3):  # e.g. prepare then, with `immediate`, activate
                authorities = await self._ctx.read(lambda tx: tx.list_authorities())
                now = self._ctx.clock.now()
                actions = plan(
                    authorities,
                    now,
                    self.settings,
                    requested=self._requested,
                    immediate=immediate,
                )
                imported = import_activation(authorities, now, self.settings.min_propagation)
                if not actions and imported is not None:
                    actions = [imported]
                if not actions:
                    break
                for action in actions:
                    await self._apply(action, authorities, now)
                done += actions
                await self.reload()
                if any(a.kind == "activate" for a in actions):
                    self._requested = False
                    break  # a rotation ends with its activation
            await self._publish_bundle_changes()
            return done

    async def _publish_bundle_changes(self) -> None:
        """A retired root leaves the bundle when its last leaf has expired: no journal
        change marks that moment, so bump the version to make every peer hear of it."""
        ctx = self._ctx
        now = ctx.clock.now()

        def load(tx: Tx) -> tuple[list[Authority], dict[str, float]]:
            return tx.list_authorities(), tx.latest_expiry_by_issuer()

        authorities, expiry = await ctx.read(load)
        wanted = bundle_root_ids(authorities, now, expiry, self.settings.retired_grace)
        published = {fingerprint_sha256(root) for root in ctx.trust.snapshot.roots}
        held = {a.id for a in authorities if a.kind == "root" and a.fingerprint_sha256 in published}
        if wanted == held:
            return
        dropped = sorted(held - wanted)
        events = [
            event(
                now,
                "system",
                "authority.unpublish",
                root_id,
                reason="every leaf signed under this retired root has expired",
            )
            for root_id in dropped
        ]

        def bump(tx: Tx) -> None:
            tx.bump_bundle_version()
            notify_trust_changed(tx)

        await ctx.write(bump, events)
        await self.reload()

    @property
    def kek(self) -> Kek:
        return self._kek

    async def require_lease(self) -> None:
        """Take the cluster-wide rotation lease, or say which replica holds it."""
        if not await self._ctx.take_lease(ROTATION_LEASE, self.settings.lease):
            now = self._ctx.clock.now()
            holder = await self._ctx.read(lambda tx: tx.lease_holder(ROTATION_LEASE, now))
            raise FailedPrecondition(
                f"another CA replica ({holder}) is running the rotation job; run the command "
                f"there, or retry once its lease runs out (at most {self.settings.lease:.0f}s)"
            )

    async def request_rotation(self, *, immediate: bool) -> list[Action]:
        """An operator's `authority rotate`: prepare and publish now; activate once the new
        authority has propagated (the scheduled check does it), or at once if `immediate`."""
        await self.require_lease()
        self._requested = True
        actions = await self.tick(immediate=immediate)
        if self._requested:
            authorities = await self._ctx.read(lambda tx: tx.list_authorities())
            due = self.activation_due_at(authorities)
            if due is not None:
                await self.schedule_activation(due)
        if immediate:
            log.warning(
                "authority rotated at once on request, before peers could learn the new trust "
                "bundle; sidecars that have not fetched it yet may refuse new certificates",
            )
        return actions

    async def _activate_at(self, due: float) -> None:
        await self._ctx.clock.sleep_until(due)
        try:
            await self.tick()
        except CAError as exc:
            log.error(
                "requested activation failed; the scheduled check will retry",
                extra={"reason": exc.message},
            )

    async def stop(self) -> None:
        await self._cancel_pending_activation()
        self._stopped = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _cancel_pending_activation(self) -> None:
        task, self._pending_activation = self._pending_activation, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def schedule_activation(self, due: float) -> None:
        """Run the rotation check at `due` (a prepared authority's activation time)."""
        await self._cancel_pending_activation()
        self._pending_activation = asyncio.create_task(
            self._activate_at(due), name="requested-activation"
        )

    def activation_due_at(self, authorities: list[Authority]) -> float | None:
        """When a requested rotation's prepared authority may be activated."""
        prepared = prepared_intermediate(authorities)
        if prepared is None or not self._requested:
            return None
        root = next((a for a in authorities if a.id == prepared.parent_id), None)
        published = (
            root.created_at
            if root is not None and root.state == "prepared"
            else prepared.created_at
        )
        return published + self.settings.min_propagation

    async def _apply(self, action: Action, authorities: list[Authority], now: float) -> None:
        ctx = self._ctx
        by_id = {a.id: a for a in authorities}
        td = ctx.config.trust_domain
        if action.kind == "prepare_intermediate":
            root = by_id[action.authority_id or ""]
            created = [
                new_intermediate(
                    root,
                    decrypt_private_key(root, self._kek),
                    trust_domain=td,
                    ttl=self.settings.intermediate_ttl,
                    now=now,
                    kek=self._kek,
                )
            ]
        elif action.kind == "prepare_generation":
            created = new_generation(
                td,
                root_ttl=self.settings.root_ttl,
                intermediate_ttl=self.settings.intermediate_ttl,
                now=now,
                kek=self._kek,
            )
        else:
            await self._activate(by_id, action, now)
            return
        events = [
            event(
                now,
                "system",
                "authority.prepare",
                a.id,
                kind=a.kind,
                reason=action.reason,
                fingerprint=a.fingerprint_sha256,
                not_after=utc(a.not_after).isoformat(),
            )
            for a in created
        ]

        def add(tx: Tx) -> None:
            for a in created:
                tx.add_authority(a)
            notify_trust_changed(tx)

        await ctx.write(add, events)

    async def _activate(self, by_id: dict[str, Authority], action: Action, now: float) -> None:
        prepared = by_id[action.authority_id or ""]
        new_root = by_id.get(prepared.parent_id or "")
        if new_root is None:
            raise FailedPrecondition(f"the root of prepared intermediate {prepared.id} is missing")
        changes: list[tuple[str, str]] = [(prepared.id, "active")]
        for a in by_id.values():
            if a.kind == "intermediate" and a.state == "active":
                changes.append((a.id, "retired"))
            if a.kind == "root" and a.state == "active" and a.id != new_root.id:
                changes.append((a.id, "retired"))
        if new_root.state == "prepared":
            changes.append((new_root.id, "active"))
        events = [
            event(
                now,
                "system",
                "authority.activate" if state == "active" else "authority.retire",
                authority_id,
                reason=action.reason,
            )
            for authority_id, state in changes
        ]

        def apply(tx: Tx) -> None:
            for authority_id, state in changes:
                tx.set_authority_state(authority_id, state, now)  # type: ignore[arg-type]
            notify_trust_changed(tx)

        await self._ctx.write(apply, events)
        log.warning(
            "signing authority rotated",
            extra={
                "activated": prepared.id,
                "reason": action.reason,
                "retired": [i for i, s in changes if s == "retired"],
            },
        )
