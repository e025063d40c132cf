"""Scheduled rotation in accelerated time: intermediates rotate at 5/6 of their life, a root
rotates past its half-life, and at every hour every live leaf still verifies against the
trust bundle of that moment AND against the bundle of an hour before, which is what a
sidecar that has not yet heard the latest update holds (no window in which a peer would
reject another), and no leaf outlives its issuer."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshtls.clock import ManualClock
from meshtls.identity.ids import SpiffeId
from tests.support.ca import running_ca
from tests.support.trust import issue_recorded_leaf, verifies

HOUR = 3600.0
DAY = 24 * HOUR
LEAF_TTL = 6 * HOUR  # leaves outlive several hourly steps, so they straddle every rotation


async def test_three_intermediate_generations_and_a_root_rotation_keep_every_leaf_trusted(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    async with running_ca(
        tmp_path,
        clock=clock,
        root_ttl=24 * DAY,
        intermediate_ttl=4 * DAY,
        node_ttl=LEAF_TTL,
        default_leaf_ttl=LEAF_TTL,
        max_leaf_ttl=LEAF_TTL,
        retired_root_grace=HOUR,
        rotation_check_interval=24 * HOUR,  # the test drives the rotation job itself
        trust_poll_interval=24 * HOUR,
    ) as ca:
        assert ca.server is not None
        assert ca.server.ctx is not None
        assert ca.server.authorities is not None
        ctx, authorities = ca.server.ctx, ca.server.authorities
        key = ec.generate_private_key(ec.SECP256R1())
        spiffe_id = SpiffeId.parse("spiffe://example.org/svc/web")
        start = clock.now()
        leaves: list[tuple[x509.Certificate, list[x509.Certificate]]] = []
        signers, bundles = set(), set()
        previous_roots = list(ctx.trust.snapshot.roots)
        while clock.now() < start + 16 * DAY:
            clock.set_sync(clock.now() + HOUR)
            await authorities.tick()
            now = clock.now()
            leaf, chain = await issue_recorded_leaf(ctx, key.public_key(), spiffe_id, LEAF_TTL)
            leaves.append((leaf, chain))
            signers.add(ctx.trust.keyring.signer.authority_id)
            roots = list(ctx.trust.snapshot.roots)
            bundles.add(tuple(r.fingerprint(leaf.signature_hash_algorithm) for r in roots))  # type: ignore[arg-type]
            live = [(c, ch) for c, ch in leaves if c.not_valid_after_utc.timestamp() > now]
            for leaf, chain in live:
                for bundle, which in ((roots, "current"), (previous_roots, "previous")):
                    assert verifies(leaf, chain, bundle, now), (
                        f"a live leaf (serial {leaf.serial_number:x}) does not verify against "
                        f"the {which} bundle at +{(now - start) / HOUR:.0f}h"
                    )
                assert leaf.not_valid_after_utc <= chain[0].not_valid_after_utc
            previous_roots = roots
        with ctx.store.read() as tx:
            journal = tx.list_authorities()
    intermediates = [a for a in journal if a.kind == "intermediate"]
    root_records = [a for a in journal if a.kind == "root"]
    assert len(signers) >= 4, f"expected 3 intermediate rotations, saw {len(signers)} signers"
    assert len(root_records) >= 2, "the root never rotated"
    assert sum(a.state == "active" for a in intermediates) == 1
    assert sum(a.state == "active" for a in root_records) == 1
    assert len(bundles) >= 3  # one root, then two during the overlap, then the new one alone
