"""Retries against a CA that is not there (a real, refused TCP port): exponential backoff
with jitter, capped, counted by reason, and not cut short by a wake-up; the join token is
looked for on every attempt."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest

from meshtls.clock import ManualClock
from sidecar.config import SidecarConfig
from sidecar.identity.ca_client import CAClient
from sidecar.identity.ca_messages import TrustUpdate
from sidecar.identity.manager import TOKEN_POLL_SECONDS, IdentityManager
from sidecar.identity.model import TrustBundle
from sidecar.identity.state import StateStore
from tests.sidecar.helpers import config_from, sidecar_document, wait_for
from tests.support.pki import ThrowawayCA


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def config(tmp_path: Path) -> SidecarConfig:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ThrowawayCA.root().cert_pem)
    port = refused_port()
    doc = sidecar_document(
        tmp_path,
        agent_address=f"127.0.0.1:{port}",
        enroll_address=f"127.0.0.1:{port}",
        bundle_path=bundle,
        token_file=tmp_path / "token",
        renewal={"retry_initial_seconds": 1, "retry_max_seconds": 8},
    )
    return config_from(tmp_path, doc)


@pytest.fixture
async def running(config: SidecarConfig) -> AsyncIterator[tuple[IdentityManager, ManualClock]]:
    # A fixed start and seeded jitter: every run computes the same times, float rounding
    # included.
    clock = ManualClock(start=1_796_218_842.703_794)
    client = CAClient(config.ca)
    store = StateStore(config.state_dir, config.trust_domain, config.node)
    manager = IdentityManager(config, clock=clock, client=client, store=store, rng=random.Random(1))
    task = asyncio.create_task(manager.run())
    try:
        yield manager, clock
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.close()


def failures(manager: IdentityManager, reason: str) -> int:
    return manager.health.failures_by_reason().get(reason, 0)


def at_least(manager: IdentityManager, count: int) -> bool:
    return failures(manager, "unavailable") >= count


async def test_waits_for_a_token_and_reads_it_on_every_attempt(
    config: SidecarConfig, running: tuple[IdentityManager, ManualClock]
) -> None:
    manager, clock = running
    await wait_for(lambda: failures(manager, "no_join_token") >= 1, what="first attempt")
    assert manager.problem() == (
        f"node web-1 is not enrolled; provide a join token in {config.ca.join_token_file}"
    )
    assert not manager.readiness()[0]
    # Looking for a token is local and cheap: never wait long for it.
    assert manager.retry_at - clock.now() <= TOKEN_POLL_SECONDS
    assert manager.ca_reachable() is None  # the CA was not called

    assert config.ca.join_token_file is not None
    config.ca.join_token_file.write_text("tok-123\n")
    await clock.advance(TOKEN_POLL_SECONDS)
    await wait_for(lambda: failures(manager, "unavailable") >= 1, what="enroll attempt")
    assert manager.ca_reachable() is False
    last = manager.health.last_error
    assert last is not None
    assert last.operation == "enroll"
    assert f"cannot reach the CA at {config.ca.enroll_address}" in last.message


@pytest.fixture
def token(config: SidecarConfig) -> None:
    assert config.ca.join_token_file is not None
    config.ca.join_token_file.write_text("tok-123\n")


@pytest.mark.usefixtures("token")
async def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(
    running: tuple[IdentityManager, ManualClock],
) -> None:
    manager, clock = running
    delays = []
    for attempt in range(1, 8):
        await wait_for(partial(at_least, manager, attempt), what=f"attempt {attempt}")
        delay = manager.retry_at - clock.now()
        ceiling = min(8.0, 2.0 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling, (attempt, delay)
        delays.append(delay)
        # Nothing happens before the delay is over...
        await clock.advance(delay * 0.9)
        assert failures(manager, "unavailable") == attempt
        await clock.advance(delay * 0.1 + 0.001)
    assert max(delays) <= 8.0
    assert manager.health.total_failures() >= 7


@pytest.mark.usefixtures("token")
async def test_a_wake_at_the_moment_of_a_failure_does_not_cut_its_backoff(
    config: SidecarConfig, running: tuple[IdentityManager, ManualClock]
) -> None:
    """A trust update (the Watch stream) wakes the manager; at the very time of the last
    failure that must not count as the clock going backwards. retry_at is now + delay
    rounded to a float, and comparing `retry_at - now` with the delay said "backwards" for
    about half of all delays, retrying at once. The start time and the jitter are fixed, so
    this run is the same every time (and retried early with that comparison)."""
    manager, clock = running
    bundle = TrustBundle(config.trust_domain, (ThrowawayCA.root().cert,), 1)
    updates = 0
    for attempt in range(1, 7):
        await wait_for(partial(at_least, manager, attempt), what=f"attempt {attempt}")
        retry_at = manager.retry_at
        for _ in range(3):
            updates += 1
            revoked = frozenset({format(updates, "x")})  # tells the updates apart
            manager.offer_trust_update(TrustUpdate(updates, bundle, revoked))
            await wait_for(
                lambda revoked=revoked: manager.snapshot().revoked == revoked,  # type: ignore[misc]
                what="update applied",
            )
        assert failures(manager, "unavailable") == attempt
        assert manager.retry_at == retry_at
        await clock.advance(retry_at - clock.now())
