"""The identity lifecycle: enroll the node, keep its certificate fresh, obtain and renew
every workload identity registered for it, and publish each change.

One task runs `cycle()` whenever something is due and sleeps (on the injected Clock) until
the next renewal point, the next refresh of the entry list, the next expiry, or the end
of a backoff. Only that task changes state (`Holder`); the Watch stream
(`sidecar.identity.watch`) hands its updates over and wakes it. Failures never drop a
certificate that is still valid: the last good one is served until it expires, while
retries back off exponentially with jitter and honour the CA's retry-after.
"""

from __future__ import annotations

import asyncio
import logging
import random

from meshtls.clock import Clock
from meshtls.identity.rotation import Backoff
from sidecar.config import SidecarConfig
from sidecar.errors import (
    CAError,
    CAInvalidResponse,
    CAPermissionDenied,
    CAUnauthenticated,
    CAUnavailable,
    NoJoinToken,
)
from sidecar.identity.ca_client import CAClient
from sidecar.identity.ca_messages import TrustUpdate
from sidecar.identity.enrollment import Enroller
from sidecar.identity.health import Health
from sidecar.identity.holder import Holder, iso
from sidecar.identity.model import Entry, NodeIdentity, Snapshot, Svid
from sidecar.identity.publisher import SnapshotPublisher, Subscription
from sidecar.identity.renewals import Renewer
from sidecar.identity.state import StateStore
from sidecar.identity.workloads import batches, due_entries, schedule_renewal
from sidecar.metrics import SidecarMetrics

log = logging.getLogger(__name__)

# While waiting for an operator to drop a join token, look for it at least this often.
TOKEN_POLL_SECONDS = 5.0
_AGENT_OPERATIONS = {"renew_node", "list_identities", "sign_identities", "get_trust_bundle"}
_NODE_OPERATIONS = {"renew_node", "list_identities"}


class IdentityManager:
    def __init__(
        self,
        config: SidecarConfig,
        *,
        clock: Clock,
        client: CAClient,
        store: StateStore,
        metrics: SidecarMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._client = client
        self._store = store
        self._rng = rng or random.Random()
        r = config.renewal
        self._backoff = Backoff(r.retry_initial_seconds, r.retry_max_seconds, rng=self._rng)
        self.health = Health(metrics)
        self._publisher = SnapshotPublisher()
        self._holder = Holder(config.trust_domain, config.node, client, store)
        self._enroller = Enroller(config, client)
        self._renewer = Renewer(config, client, self._holder, self.health, self._schedule)
        self._pending_trust: TrustUpdate | None = None
        self.trust_version = 0  # last Watch snapshot version handed over
        self.retry_at = 0.0  # no CA call before this time (backoff)
        self._failed_at = 0.0  # when retry_at was last set by a failure
        self._last_failure = ""
        self._node_expired_at: float | None = None
        self._node_rejected: str | None = None
        self._wake = asyncio.Event()
        self._started = False
        self.state_problems: list[str] = []

    # -- what others read ----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return self._publisher.current()

    def subscribe(self) -> Subscription:
        """Snapshots: the current one at once, then the newest after every change."""
        return self._publisher.subscribe()

    @property
    def has_node(self) -> asyncio.Event:
        """Set while a node certificate is held (the agent listener can be called)."""
        return self._holder.has_node

    @property
    def persist_failures(self) -> int:
        """Writes to the state directory that failed (the disk is full or read-only)."""
        return self._holder.persist_failures

    def ca_reachable(self) -> bool | None:
        return self.health.ca_reachable

    def entries(self) -> tuple[Entry, ...] | None:
        entries = self._holder.entries
        return None if entries is None else tuple(entries.values())

    def problem(self) -> str | None:
        """The condition that needs an operator, worded as what to do about it."""
        name, ca = self.config.node, self.config.ca
        if self._holder.node is None:
            if self._node_expired_at is not None:
                text = (
                    f"node certificate expired at {iso(self._node_expired_at)}; "
                    f"{ca.enroll_action(new=True)}"
                )
            elif self._node_rejected is not None:
                text = (
                    f"the CA no longer accepts this node's certificate ({self._node_rejected}); "
                    f"{ca.enroll_action(new=True)}"
                )
            else:
                text = f"node {name} is not enrolled; {ca.enroll_action()}"
            why = self._enroller.token_problem
            return f"{text} ({why})" if why else text
        if self._renewer.refused is not None:
            return (
                f"the CA refuses node {name}: {self._renewer.refused}; certificates are not "
                "renewed and stop being served when they expire"
            )
        return None

    def readiness(self) -> tuple[bool, str]:
        """(True, "ready") once the node and every registered identity are held, unexpired."""
        now = self._clock.now()
        snap = self.snapshot()
        if snap.node is None or snap.node.svid.expired(now):
            return False, self.problem() or "no node certificate"
        entries = self._holder.entries
        if entries is None:
            return False, "the registration entries of this node have not been listed yet"
        missing = [
            str(e.spiffe_id)
            for e in entries.values()
            if e.id not in snap.identities or snap.identities[e.id].svid.expired(now)
        ]
        if missing:
            return False, "no valid certificate yet for " + ", ".join(sorted(missing))
        return True, "ready"

    def wake(self) -> None:
        """Run a cycle now, skipping any backoff (SIGHUP, a new join token, tests)."""
        self.retry_at = 0.0
        self._wake.set()

    def offer_trust_update(self, update: TrustUpdate, *, polled: bool = False) -> bool:
        """Called by the Watch task; the update is applied by the manager's own task.
        A `polled` update older than what the stream delivered is dropped (False)."""
        if polled and update.version < self.trust_version:
            return False
        self.trust_version = max(self.trust_version, update.version)
        self._pending_trust = update
        self._wake.set()
        return True

    # -- startup -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the state directory and publish what it holds (before any CA call)."""
        if self._started:
            return
        self._started = True
        self._store.prepare()
        now = self._clock.now()
        state = self._store.load(now)
        self.state_problems = state.problems
        expired_at = await self._holder.load(state, now, self._schedule)
        if expired_at is not None:
            self._node_expired(expired_at)
        self._publish()
        log.info(
            "state loaded",
            extra={
                "state_dir": str(self._store.directory),
                "node_held": self._holder.node is not None,
                "identities": len(self._holder.identities),
                "bundle_version": self._holder.bundle.version if self._holder.bundle else None,
            },
        )

    def _schedule(self, svid: Svid, now: float, fresh: bool) -> float:
        r = self.config.renewal
        return schedule_renewal(
            svid.not_before,
            svid.not_after,
            now,
            fraction=r.fraction,
            jitter=r.jitter,
            fresh=fresh,
            rng=self._rng,
        )

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the lifecycle until cancelled."""
        await self.start()
        while True:
            try:
                await self.cycle()
            except CAError as exc:
                await self._failed(exc)
            else:
                if self._backoff.attempts:
                    log.info(
                        "CA calls succeed again", extra={"after_failures": self._backoff.attempts}
                    )
                self._backoff.reset()
                self._last_failure = ""
            finally:
                self._publish()
            await self._sleep_until(self._next_wake())

    async def cycle(self) -> None:
        """Do whatever is due now; raises CAError when a CA call or its answer fails."""
        holder = self._holder
        now = self._clock.now()
        await self._apply_pending_trust()
        await self._expire(now)
        if now < self._failed_at:
            self.retry_at = now  # the clock went backwards: do not wait out the jump
        if now < self.retry_at:
            return
        if holder.node is None:
            await self._enroll(now)
        elif holder.force_node or now >= holder.node.renew_at:
            await self._renewer.renew_node(now)
        now = self._clock.now()
        due = self._due(now)
        # Re-list before every renewal batch too, so that deleted entries are not asked for.
        if holder.entries is None or now >= self._renewer.next_refresh or due:
            await self._renewer.refresh(now)
            due = self._due(now)
        for batch in batches(due):
            await self._renewer.sign(batch, now)

    def _due(self, now: float) -> list[Entry]:
        holder = self._holder
        if holder.node is None or holder.entries is None:
            return []
        return due_entries(
            holder.entries, holder.identities, now, forced=holder.forced, revoked=holder.revoked
        )

    def _next_wake(self) -> float:
        holder = self._holder
        now = self._clock.now()
        if now < self.retry_at:
            points = [self.retry_at]
        else:
            points = [self._renewer.next_refresh]
            if holder.node is not None:
                points.append(holder.node.renew_at)
            points.extend(w.renew_at for w in holder.identities.values())
        if holder.node is not None:
            points.append(holder.node.svid.not_after)
        points.extend(w.svid.not_after for w in holder.identities.values())
        wake = min(points)
        if wake <= now:  # never spin: something is due that could not be done
            wake = now + self.config.renewal.retry_initial_seconds
        return wake

    async def _sleep_until(self, deadline: float) -> None:
        if self._wake.is_set():
            self._wake.clear()
            return
        sleeper = asyncio.ensure_future(self._clock.sleep_until(deadline))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
        self._wake.clear()

    async def _failed(self, exc: CAError) -> None:
        """Count and log a failure, and decide when to try again."""
        now = self._clock.now()
        self.health.failed(exc, now)
        delay = self._backoff.next_delay()
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        if isinstance(exc, CAUnavailable):
            await self._client.reset_connections()
        elif isinstance(exc, CAUnauthenticated) and exc.operation in _AGENT_OPERATIONS:
            if self._holder.node is not None:
                self._node_rejected = exc.message
                await self._holder.drop_node()
        elif isinstance(exc, CAPermissionDenied) and exc.operation in _NODE_OPERATIONS:
            self._renewer.refused = exc.message
            delay = max(delay, self.config.renewal.retry_max_seconds)
        if isinstance(exc, NoJoinToken):
            delay = min(delay, TOKEN_POLL_SECONDS)
        self.retry_at = now + delay
        self._failed_at = now
        problem = self.problem()
        level = logging.ERROR if problem else logging.WARNING
        # Waiting for a token is polled every few seconds: say it once, not every time.
        repeated = isinstance(exc, NoJoinToken) and str(exc) == self._last_failure
        self._last_failure = str(exc)
        log.log(
            logging.DEBUG if repeated else level,
            "CA operation failed: %s",
            exc,
            extra={
                "operation": exc.operation,
                "reason": exc.reason,
                "retry_in_seconds": round(delay, 3),
                "attempt": self._backoff.attempts,
                "problem": problem,
            },
        )

    def _publish(self) -> None:
        if not self._holder.dirty:
            return
        self._holder.dirty = False
        self._publisher.publish(self._holder.snapshot(self._publisher.current().version + 1))

    # -- expiry, enrollment, trust updates -----------------------------------------------

    def _node_expired(self, not_after: float) -> None:
        self._node_expired_at = not_after
        log.error(
            "node certificate expired at %s; %s",
            iso(not_after),
            self.config.ca.enroll_action(new=True),
            extra={"node": self.config.node, "not_after": iso(not_after)},
        )

    async def _expire(self, now: float) -> None:
        node = self._holder.node
        if node is not None and node.svid.expired(now):
            self._node_expired(node.svid.not_after)
            await self._holder.drop_node()
        self._holder.expire(now)

    async def _enroll(self, now: float) -> None:
        enrolled = await self._enroller.enroll(now, self._holder.bundle)
        self.health.contacted(now)
        await self._holder.install_bundle(enrolled.bundle, force=True)
        svid = enrolled.svid
        await self._holder.set_node(
            NodeIdentity(self.config.node, svid, now, self._schedule(svid, now, True))
        )
        self.health.renewed("node")
        self._node_expired_at = self._node_rejected = self._renewer.refused = None
        self._renewer.next_refresh = now
        log.info(
            "node enrolled",
            extra={
                "node": enrolled.node_name,
                "spiffe_id": str(svid.spiffe_id),
                "serial": svid.serial,
                "not_after": iso(svid.not_after),
            },
        )

    async def _apply_pending_trust(self) -> None:
        update, self._pending_trust = self._pending_trust, None
        if update is None:
            return
        try:
            await self._holder.install_bundle(update.bundle)
        except CAInvalidResponse as exc:
            log.warning("ignoring a trust update from the CA", extra={"error": exc.message})
        self._holder.set_revoked(update.revoked)
