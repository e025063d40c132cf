"""The bound on how stale a replica's signing authority can be.

Every CA replica builds its signer from the database and keeps following the bundle
version (LISTEN/NOTIFY on PostgreSQL, and a poll everywhere). A replica that cannot reach
the database, or whose reads are stuck, would otherwise go on signing with an authority
another replica has since retired. The fence prevents that: each read that finds the
signer's authority still the active intermediate records the moment the read *started*
(the database snapshot it saw is at least that recent), and the signer refuses to sign
(UNAVAILABLE, with a retry hint) once the last confirmation is older than `max_age`
(`trust_poll_interval`, at least 1 s). So no leaf is signed by an authority more than
`max_age` after it stopped being the active one cluster-wide.

The confirming reads run on their own thread (`FenceHeartbeat`), not on the event loop: a
loop flooded with signing requests (a renewal storm) would otherwise delay them past
`max_age` and close the fence although nothing changed.

Elapsed time here is the process's monotonic clock: it measures how old a database read
is, not certificate validity (which uses the injected `Clock`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from ca_server.authority.kek import Kek
from ca_server.authority.keys import decrypt_private_key
from ca_server.authority.signer import SignedLeaf, Signer
from ca_server.authority.templates import IPAddress
from ca_server.db.store import Store
from ca_server.domain import Authority
from ca_server.errors import CAError, Unavailable
from meshtls.identity.ids import SpiffeId

log = logging.getLogger(__name__)


class SigningFence:
    """Thread-safe: confirmed from the heartbeat thread and the event loop."""

    def __init__(self, max_age: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self._monotonic = monotonic
        self._confirmed_at: float | None = None
        self._lock = threading.Lock()

    def mark(self) -> float:
        """Call right before a read whose answer may confirm the signer; pass the result to
        `confirm` if it does."""
        return self._monotonic()

    def confirm(self, started_at: float) -> None:
        with self._lock:
            if self._confirmed_at is None or started_at > self._confirmed_at:
                self._confirmed_at = started_at

    def age(self) -> float | None:
        """Seconds since the signer was last confirmed current (None: never)."""
        if self._confirmed_at is None:
            return None
        return self._monotonic() - self._confirmed_at

    def check(self, authority_id: str) -> None:
        """Raise Unavailable when the signer may no longer be the active authority."""
        age = self.age()
        if age is None or age <= self.max_age:
            return
        raise Unavailable(
            f"this CA replica could not confirm for {age:.1f}s that its signing authority "
            f"{authority_id} is still the active one (the database is unreachable or slow); "
            "retry, or use another replica",
            retry_after=max(0.5, self.max_age / 2),
        )


class FencedSigner(Signer):
    """A Signer that consults a SigningFence before every leaf it signs."""

    __slots__ = ("_fence",)
    _fence: SigningFence

    @classmethod
    def wrap(
        cls, signer: Signer, authority: Authority, kek: Kek, fence: SigningFence
    ) -> FencedSigner:
        """The same authority as `signer` (same certificate, key and chain), fenced."""
        fenced = cls(
            authority_id=signer.authority_id,
            cert=signer.cert,
            key=decrypt_private_key(authority, kek),
            parent_chain=signer.chain[1:],
        )
        fenced._fence = fence
        return fenced

    def issue_der(
        self,
        public_key: object,
        spiffe_id: SpiffeId,
        *,
        ttl_seconds: int,
        now: float,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str | IPAddress] = (),
    ) -> SignedLeaf:
        self._fence.check(self.authority_id)
        return super().issue_der(
            public_key,
            spiffe_id,
            ttl_seconds=ttl_seconds,
            now=now,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )


class FenceHeartbeat:
    """A thread that reads the database every `period` and confirms the fence while the
    signer in use (`held()` -> (bundle version, signer authority id)) is still the active
    intermediate; it calls `on_change` (from its thread) when the database holds a newer
    version or another signer, so the event loop reloads. It also hands every access
    version it reads to `on_access_version` (from its thread), which drops cached node and
    entry answers when the version is news."""

    def __init__(
        self,
        fence: SigningFence,
        store: Store,
        held: Callable[[], tuple[int, str]],
        on_change: Callable[[], object],
        period: float,
        on_access_version: Callable[[int], object],
    ) -> None:
        self._fence = fence
        self._store = store
        self._held = held
        self._on_change = on_change
        self._on_access_version = on_access_version
        self._access_version: int | None = None
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="signing-fence", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (it may be inside a stalled read; it is not waited for)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.beat()
            except Exception:  # keep beating: a bug here must not stop signing for good
                log.exception("signing fence heartbeat failed")

    def beat(self) -> None:
        started = self._fence.mark()
        try:
            with self._store.read() as tx:
                version = tx.bundle_version()
                states = tx.intermediate_states()
                access_version = tx.access_version()
            active = {authority_id for authority_id, state in states.items() if state == "active"}
        except CAError as exc:
            if not self._failing:
                log.warning(
                    "cannot confirm the signing authority; signing stops once the last "
                    "confirmation is older than trust_poll_interval",
                    extra={"reason": exc.message, "max_age": self._fence.max_age},
                )
            self._failing = True
            return
        if self._failing:
            log.info("signing authority confirmed again")
        self._failing = False
        held_version, signer_id = self._held()
        if signer_id in active:
            self._fence.confirm(started)
        try:
            if access_version != self._access_version:
                self._on_access_version(access_version)
                self._access_version = access_version
            if version != held_version or signer_id not in active:
                self._on_change()
        except RuntimeError:  # the event loop has closed: the CA is stopping
            self._stop.set()
