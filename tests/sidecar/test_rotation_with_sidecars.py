"""Issue 3's rotation scenario with real sidecars connected the whole time: the CA runs 16
days of accelerated time (four intermediates and one root rotation) while two sidecars
hold Watch streams. Whenever a new authority enters the bundle, each sidecar holds the new
bundle within 2 s of real time, and at every hour every live leaf verifies against EACH
sidecar's bundle: no window in which one peer would reject another.

Only the CA's clock is accelerated; TLS checks certificates against the real clock, so
certificates the CA issues late in the run are "not yet valid" for a real handshake. The
sidecars keep the streams they opened at the start. When the retired root finally leaves
the bundle, a sidecar's bundle shrinks; nothing has to wait for that (a larger bundle is
safe), and re-handshakes after it would need certificates valid in real time, so the test
ends its push checks there. The leaves checked are the ones the CA signs each hour, as
renewing workloads would get them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshtls.clock import ManualClock
from meshtls.identity.ids import SpiffeId
from sidecar.app import SidecarApp
from sidecar.identity.model import TrustBundle
from tests.sidecar.helpers import config_from, sidecar_document, wait_for
from tests.support.ca import RunningCA, running_ca
from tests.support.trust import issue_recorded_leaf, verifies

HOUR = 3600.0
DAY = 24 * HOUR
LEAF_TTL = 6 * HOUR


@asynccontextmanager
async def sidecars(
    tmp_path: Path, ca: RunningCA, names: list[str]
) -> AsyncIterator[list[SidecarApp]]:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.bundle_pem)
    async with AsyncExitStack() as stack:
        apps = []
        for name in names:
            token = tmp_path / f"{name}.token"
            token.write_text(await ca.create_join_token(name))
            home = tmp_path / name
            home.mkdir()
            doc = sidecar_document(
                home,
                agent_address=ca.agent_address,
                enroll_address=ca.enroll_address,
                bundle_path=bundle,
                node=name,
                token_file=token,
            )
            app = SidecarApp(config_from(home, doc), clock=ManualClock())
            await app.start()
            stack.push_async_callback(app.stop)
            apps.append(app)
        yield apps


Bundles = list[tuple[str, TrustBundle]]


def held_bundles(apps: list[SidecarApp]) -> Bundles:
    """The trust bundle each sidecar holds right now, by node name."""
    held = []
    for app in apps:
        bundle = app.manager.snapshot().bundle
        assert bundle is not None
        held.append((app.config.node, bundle))
    return held


def check_every_live_leaf(
    bundles: Bundles,
    leaves: list[tuple[x509.Certificate, list[x509.Certificate]]],
    now: float,
    start: float,
) -> None:
    for node, held in bundles:
        roots = list(held.roots)
        for leaf, chain in leaves:
            if leaf.not_valid_after_utc.timestamp() <= now:
                continue
            assert verifies(leaf, chain, roots, now), (
                f"{node}'s bundle (v{held.version}) rejects a live leaf signed by "
                f"{chain[0].subject.rfc4514_string()} at +{(now - start) / HOUR:.0f}h"
            )


def bundle_version(app: SidecarApp) -> int:
    bundle = app.manager.snapshot().bundle
    return -1 if bundle is None else bundle.version


async def test_sidecars_keep_trusting_every_live_leaf_through_rotations(tmp_path: Path) -> None:
    clock = ManualClock()
    async with (
        running_ca(
            tmp_path / "ca-home",
            clock=clock,
            root_ttl=24 * DAY,
            intermediate_ttl=4 * DAY,
            node_ttl=LEAF_TTL,
            default_leaf_ttl=LEAF_TTL,
            max_leaf_ttl=LEAF_TTL,
            retired_root_grace=HOUR,
            rotation_check_interval=24 * HOUR,  # the test drives the rotation job itself
            trust_poll_interval=24 * HOUR,
        ) as ca,
        sidecars(tmp_path, ca, ["web-1", "api-1"]) as apps,
    ):
        assert ca.server is not None
        assert ca.server.ctx is not None
        assert ca.server.authorities is not None
        ctx = ca.server.ctx
        await wait_for(
            lambda: all(app.manager.readiness()[0] for app in apps), within=15, what="enrollment"
        )
        key = ec.generate_private_key(ec.SECP256R1())
        spiffe_id = SpiffeId.parse("spiffe://example.org/svc/web")
        leaves: list[tuple[x509.Certificate, list[x509.Certificate]]] = []
        start = clock.now()
        pushes = 0
        while clock.now() < start + 16 * DAY:
            clock.set_sync(clock.now() + HOUR)
            roots_before = set(ctx.trust.snapshot.roots)
            # What every sidecar holds before this tick: a peer that has not yet heard of
            # the tick's changes (taken now, so the check does not race the Watch push).
            before = held_bundles(apps)
            await ca.server.authorities.tick()
            now = clock.now()
            # A workload renews right away with whatever signs now; its peers may still
            # hold the bundle from before the tick, or already the new one.
            leaves.append(await issue_recorded_leaf(ctx, key.public_key(), spiffe_id, LEAF_TTL))
            check_every_live_leaf(before, leaves, now, start)
            check_every_live_leaf(held_bundles(apps), leaves, now, start)
            version = ctx.trust.snapshot.version
            if set(ctx.trust.snapshot.roots) - roots_before:
                pushes += 1
                pushed_at = time.monotonic()

                def every_sidecar_holds(wanted: int = version) -> bool:
                    return all(bundle_version(app) >= wanted for app in apps)

                await wait_for(
                    every_sidecar_holds,
                    within=2.0,
                    what=f"bundle version {version} on every sidecar",
                )
                assert time.monotonic() - pushed_at < 2.0
                check_every_live_leaf(held_bundles(apps), leaves, now, start)
        with ctx.store.read() as tx:
            journal = tx.list_authorities()
    assert sum(a.kind == "root" for a in journal) >= 2
    assert sum(a.kind == "intermediate" for a in journal) >= 4
    assert pushes >= 1  # the new root was pushed to both sidecars before it signed anything
