"""The rotation job at run time: `AuthorityManager` runs the rotation policy under the
cluster-wide rotation lease (scheduled checks, an operator's `authority rotate`, the
activation of an imported intermediate once it is due) and owns this replica's view of
the authority journal.

It composes two parts with one job each: `services.rotation_steps` writes each planned
step to the journal, and `services.trust_follower` rebuilds and publishes the keyring and
trust snapshot, following changes other replicas commit (behind the signing fence). The
methods `reload`, `nudge`, `follow_forever`, `check_version`, `build_keyring` and `fence`
are the follower's, offered here so callers hold one object."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from ca_server.authority.kek import Kek
from ca_server.authority.keyring import Keyring
from ca_server.authority.rotation import (
    Action,
    RotationSettings,
    plan,
    prepared_intermediate,
)
from ca_server.authority.upstream_import import import_activation
from ca_server.domain import Authority
from ca_server.errors import CAError, FailedPrecondition
from ca_server.services.context import CAContext
from ca_server.services.rotation_steps import apply_action, unpublish_expired_roots
from ca_server.services.signing_fence import SigningFence
from ca_server.services.trust_follower import TrustFollower

log = logging.getLogger(__name__)

ROTATION_LEASE = "rotation"


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What `services.authority_import.import_intermediate` returns."""

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
        self._lock = asyncio.Lock()
        self._requested = False
        self._pending_activation: asyncio.Task[None] | None = None
        self._follower = TrustFollower(
            ctx, kek, settings.retired_grace, on_roots_changed, monotonic
        )

    # -- this replica's view of the journal (services.trust_follower) --------------------

    @property
    def fence(self) -> SigningFence:
        return self._follower.fence

    def build_keyring(
        self, authorities: list[Authority], last_leaf_expiry: dict[str, float]
    ) -> Keyring:
        return self._follower.build_keyring(authorities, last_leaf_expiry)

    async def reload(self) -> None:
        """Rebuild the keyring and the trust snapshot from the database and publish them."""
        await self._follower.reload()

    def nudge(self, version: int | None = None) -> None:
        """Another replica announced trust-state `version` (None: unknown, check): reload
        at once unless this replica already holds it."""
        self._follower.nudge(version)

    async def follow_forever(self, interval: float) -> None:
        """Pick up authorities and revocations another replica committed (see
        `TrustFollower.follow_forever`)."""
        await self._follower.follow_forever(interval)

    async def check_version(self) -> None:
        """Reload when the database holds a newer trust state."""
        await self._follower.check_version()

    # -- the rotation job ----------------------------------------------------------------

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
                    await apply_action(
                        self._ctx, self._kek, self.settings, action, authorities, now
                    )
                done += actions
                await self.reload()
                if any(a.kind == "activate" for a in actions):
                    self._requested = False
                    break  # a rotation ends with its activation
            if await unpublish_expired_roots(self._ctx, self.settings.retired_grace):
                await self.reload()
            return done

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
        self._follower.stop()

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
