"""The sidecar's identity lifecycle against a REAL CA (tests/support/ca.py): real gRPC
listeners on 127.0.0.1, real TLS and mutual TLS, a real SQLite database.

The CA runs on real time (gRPC's TLS checks use the system clock); only the sidecar's
clock is a ManualClock, started at real time and advanced to reach renewal points.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshtls.clock import ManualClock, utc
from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import certs_from_pem
from meshtls.identity.x509 import fingerprint_sha256, spiffe_id_of
from meshtls.v1 import admin_pb2
from sidecar.app import SidecarApp
from sidecar.config import SidecarConfig
from sidecar.identity.keys import key_from_pem, key_matches
from tests.sidecar.helpers import config_from, http_get, sidecar_document, wait_for
from tests.support.ca import RunningCA, running_ca
from tests.support.pki import ThrowawayCA

pytestmark = pytest.mark.slow

NODE = "web-1"
WEB = "spiffe://example.org/svc/web"
DB = "spiffe://example.org/svc/db"


@dataclass
class Env:
    tmp_path: Path
    ca: RunningCA
    bundle_path: Path
    token_file: Path

    async def new_token(self) -> None:
        self.token_file.write_text(await self.ca.create_join_token(NODE) + "\n")

    def config(self, *, files: list[dict[str, Any]] | None = None, **extra: Any) -> SidecarConfig:
        doc = sidecar_document(
            self.tmp_path,
            agent_address=self.ca.agent_address,
            enroll_address=self.ca.enroll_address,
            bundle_path=self.bundle_path,
            token_file=self.token_file,
            files=files,
            **extra,
        )
        return config_from(self.tmp_path, doc)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_ca(tmp_path) as ca:
        bundle_path = tmp_path / "bundle.pem"
        bundle_path.write_bytes(ca.bundle_pem)
        environment = Env(tmp_path, ca, bundle_path, tmp_path / "token")
        await ca.create_entry(WEB, NODE, dns_names=["web.internal"], ttl_seconds=3600)
        await ca.create_entry(DB, NODE, ttl_seconds=3600)
        await environment.new_token()
        yield environment


@asynccontextmanager
async def sidecar(config: SidecarConfig, clock: ManualClock) -> AsyncIterator[SidecarApp]:
    app = SidecarApp(config, clock=clock)
    await app.start()
    try:
        yield app
        for task in app._tasks:
            if task.done() and not task.cancelled():
                raise AssertionError(f"task {task.get_name()} died") from task.exception()
    finally:
        await app.stop()


def ready(app: SidecarApp) -> bool:
    return app.manager.readiness()[0]


def serial_of(app: SidecarApp, spiffe_id: str) -> str | None:
    for ident in app.manager.snapshot().identities.values():
        if str(ident.entry.spiffe_id) == spiffe_id:
            return ident.svid.serial
    return None


def advancer(clock: ManualClock, seconds: float) -> Any:
    async def tick() -> None:
        await clock.advance(seconds)

    return tick


async def test_enrolls_obtains_identities_in_one_batch_and_writes_files(env: Env) -> None:
    out = env.tmp_path / "out" / "web"
    marker = env.tmp_path / "reloaded"
    reload = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    config = env.config(files=[{"spiffe_id": WEB, "dir": str(out), "reload_command": reload}])
    clock = ManualClock()
    async with sidecar(config, clock) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        snap = app.manager.snapshot()
        assert snap.node is not None
        assert str(spiffe_id_of(snap.node.svid.leaf)) == f"spiffe://example.org/meshtls/node/{NODE}"
        assert sorted(str(w.entry.spiffe_id) for w in snap.identities.values()) == [DB, WEB]
        # Both identities came from ONE SignIdentities call.
        assert env.ca.server is not None
        registry = env.ca.server.ctx.metrics.registry  # type: ignore[union-attr]
        calls = registry.get_sample_value(
            "meshtls_ca_request_seconds_count", {"method": "SignIdentities"}
        )
        assert calls == 1
        await wait_for(lambda: marker.exists(), what="reload command run")

        chain = certs_from_pem((out / "svid.pem").read_bytes())
        key = key_from_pem((out / "svid_key.pem").read_bytes())
        assert str(spiffe_id_of(chain[0])) == WEB
        assert key_matches(key, chain[0])
        assert chain[0].extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName) == ["web.internal"]
        assert certs_from_pem((out / "bundle.pem").read_bytes()) == certs_from_pem(
            env.ca.bundle_pem
        )
        assert stat.S_IMODE(os.stat(out / "svid_key.pem").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(out / "svid.pem").st_mode) == 0o644
        state_dir = config.state_dir
        assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in state_dir.rglob("*.json"))

        status, body = await http_get(app.status.url + "/readyz")
        assert (status, body) == (200, b"ready\n")
        status, body = await http_get(app.status.url + "/status")
        doc = json.loads(body)
        assert status == 200
        assert doc["ready"] is True
        assert doc["ca"]["reachable"] is True
        assert {i["spiffe_id"] for i in doc["identities"]} == {WEB, DB}
        status, body = await http_get(app.status.url + "/metrics")
        text = body.decode()
        assert 'meshtls_sidecar_certificate_expiry_seconds{kind="workload",spiffe_id="' in text
        assert 'meshtls_sidecar_renewals_total{kind="workload"} 2.0' in text
        assert "meshtls_sidecar_ca_reachable 1.0" in text


async def test_renews_each_identity_at_half_life(env: Env) -> None:
    out = env.tmp_path / "out"
    config = env.config(files=[{"spiffe_id": WEB, "dir": str(out)}])
    clock = ManualClock()
    async with sidecar(config, clock) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        web = app.manager.snapshot().by_spiffe_id(SpiffeId.parse(WEB))
        assert web is not None
        life = web.svid.not_after - web.svid.not_before
        offset = web.renew_at - web.svid.not_before
        assert 0.4 * life <= offset <= 0.6 * life
        old = web.svid.serial
        await clock.advance(web.renew_at - clock.now() + 1)
        await wait_for(lambda: serial_of(app, WEB) != old, what="web identity renewed")
        new = app.manager.snapshot().identities[web.entry.id]
        assert new.renew_at > clock.now()
        await wait_for(
            lambda: (
                format(certs_from_pem((out / "svid.pem").read_bytes())[0].serial_number, "x")
                == new.svid.serial
            ),
            what="files rewritten with the new certificate",
        )
        assert ready(app)


async def test_ca_outage_keeps_last_good_certificates_and_recovers(env: Env) -> None:
    config = env.config()
    clock = ManualClock()
    async with sidecar(config, clock) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        web = app.manager.snapshot().by_spiffe_id(SpiffeId.parse(WEB))
        assert web is not None
        old = web.svid.serial
        await env.ca.stop()
        await clock.advance(web.renew_at - clock.now() + 1)
        await wait_for(
            lambda: app.manager.health.failures_by_reason().get("unavailable", 0) >= 2,
            tick=advancer(clock, 2.5),
            what="failed renewals counted",
        )
        assert serial_of(app, WEB) == old  # the last good certificate is still served
        assert ready(app)
        assert app.manager.ca_reachable() is False
        last = app.manager.health.last_error
        assert last is not None
        assert "cannot reach the CA" in last.message
        _, body = await http_get(app.status.url + "/metrics")
        assert 'meshtls_sidecar_renewal_failures_total{operation="' in body.decode()
        assert "meshtls_sidecar_ca_reachable 0.0" in body.decode()

        await env.ca.start()
        await wait_for(
            lambda: serial_of(app, WEB) != old,
            tick=advancer(clock, 2.5),
            what="renewal after the CA came back",
        )
        assert app.manager.ca_reachable() is True
        assert ready(app)


async def test_restart_during_outage_serves_persisted_identities_without_a_token(
    env: Env,
) -> None:
    out = env.tmp_path / "out"
    config = env.config(files=[{"spiffe_id": WEB, "dir": str(out)}])
    async with sidecar(config, ManualClock()) as app:
        await wait_for(lambda: ready(app), what="first sidecar ready")
        await wait_for(lambda: (out / "svid.pem").exists(), what="files written")
        served = {e: w.svid.serial for e, w in app.manager.snapshot().identities.items()}
        node_serial = app.manager.snapshot().node.svid.serial  # type: ignore[union-attr]
    env.token_file.unlink()  # the token was needed once; it is gone now
    shutil.rmtree(out)
    await env.ca.stop()

    clock = ManualClock()
    async with sidecar(config, clock) as app:
        # Ready at once, from the state directory alone: the CA is down.
        assert ready(app)
        snap = app.manager.snapshot()
        assert {e: w.svid.serial for e, w in snap.identities.items()} == served
        status, _ = await http_get(app.status.url + "/readyz")
        assert status == 200
        await wait_for(lambda: (out / "svid.pem").exists(), what="files rewritten from state")

        # When the CA is back, the persisted node certificate authenticates renewals.
        await env.ca.start()
        assert snap.node is not None
        await clock.advance(snap.node.renew_at - clock.now() + 1)
        await wait_for(
            lambda: app.manager.snapshot().node.svid.serial != node_serial,  # type: ignore[union-attr]
            tick=advancer(clock, 2.5),
            what="node renewed with the persisted certificate",
        )
        assert app.manager.health.renewals["node"] == 1
        assert app.manager.problem() is None


async def test_expired_node_certificate_is_reported_and_a_new_token_reenrolls(env: Env) -> None:
    config = env.config()
    clock = ManualClock()
    async with sidecar(config, clock) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        node = app.manager.snapshot().node
        assert node is not None
        await env.ca.stop()  # a long outage: nothing gets renewed
        await clock.advance(node.svid.not_after - clock.now() + 1)
        expected = (
            f"node certificate expired at {utc(node.svid.not_after).isoformat(timespec='seconds')}"
            f"; provide a new join token in {env.token_file}"
        )
        await wait_for(
            lambda: (app.manager.problem() or "").startswith(expected),
            what="expiry reported",
        )
        assert not ready(app)
        assert app.manager.snapshot().identities == {}  # expired ones are no longer served
        status, body = await http_get(app.status.url + "/status")
        doc = json.loads(body)
        assert doc["ready"] is False
        assert doc["problem"].startswith(expected)
        status, body = await http_get(app.status.url + "/readyz")
        assert status == 503
        assert body.decode().startswith(expected)

        # The CA is back, but the old token was used: nothing happens until a new one.
        await env.ca.start()
        # Bring the sidecar's clock back to the CA's (real) time, so that what the CA
        # issues now is valid for the sidecar too; the expired certificate stays dropped.
        # The clock went backwards, so wake the manager as an operator would (SIGHUP).
        clock.set_sync(time.time())
        app.manager.wake()
        await wait_for(
            lambda: "already used" in (app.manager.problem() or ""),
            tick=advancer(clock, 1),
            what="used token reported",
        )
        await env.new_token()
        await wait_for(lambda: ready(app), tick=advancer(clock, 1), what="re-enrolled")
        assert app.manager.snapshot().node.svid.serial != node.svid.serial  # type: ignore[union-attr]
        assert app.manager.problem() is None


async def test_banned_node_stops_renewing_with_a_clear_error(env: Env) -> None:
    config = env.config()
    clock = ManualClock()
    async with sidecar(config, clock) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        web = app.manager.snapshot().by_spiffe_id(SpiffeId.parse(WEB))
        assert web is not None
        await env.ca.ban(NODE)
        await clock.advance(web.renew_at - clock.now() + 1)
        await wait_for(
            lambda: "banned" in (app.manager.problem() or ""),
            tick=advancer(clock, 2.5),
            what="ban reported",
        )
        problem = app.manager.problem() or ""
        assert problem.startswith(f"the CA refuses node {NODE}: node {NODE} is banned")
        assert app.manager.health.failures_by_reason().get("permission_denied", 0) >= 1
        assert serial_of(app, WEB) == web.svid.serial
        # Renewals stop: the next attempt waits the longest backoff.
        assert app.manager.retry_at - clock.now() >= config.renewal.retry_max_seconds - 0.01
        _status, body = await http_get(app.status.url + "/status")
        assert "banned" in json.loads(body)["problem"]


async def test_revoked_identity_is_replaced_at_once(env: Env) -> None:
    clock = ManualClock()
    async with sidecar(env.config(), clock) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        old = serial_of(app, DB)
        assert old is not None
        await env.ca.revoke(old)
        # No clock movement: the Watch stream delivers the revocation.
        await wait_for(lambda: serial_of(app, DB) != old, what="revoked identity replaced")
        assert old in app.manager.snapshot().revoked


async def test_entries_added_and_removed_on_the_ca_are_followed(env: Env) -> None:
    clock = ManualClock()
    config = env.config()
    async with sidecar(config, clock) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        api = "spiffe://example.org/svc/api"
        await env.ca.create_entry(api, NODE, ttl_seconds=3600)
        db_entry = next(e for e in app.manager.entries() or () if str(e.spiffe_id) == DB)
        async with env.ca.admin() as stub:
            await stub.DeleteEntry(admin_pb2.DeleteEntryRequest(id=db_entry.id))
        await clock.advance(config.renewal.refresh_seconds + 1)
        await wait_for(
            lambda: serial_of(app, api) is not None and serial_of(app, DB) is None,
            what="entries followed",
        )
        assert ready(app)


async def test_pinned_root_fingerprint_bootstraps_trust(env: Env, tmp_path: Path) -> None:
    root = certs_from_pem(env.ca.bundle_pem)[0]
    doc = sidecar_document(
        tmp_path,
        agent_address=env.ca.agent_address,
        enroll_address=env.ca.enroll_address,
        bundle_path=None,
        token_file=env.token_file,
        root_fingerprint=fingerprint_sha256(root),
    )
    async with sidecar(config_from(tmp_path, doc), ManualClock()) as app:
        await wait_for(lambda: ready(app), what="sidecar ready with a pinned root")


async def test_wrong_pin_is_refused_and_reported(env: Env, tmp_path: Path) -> None:
    doc = sidecar_document(
        tmp_path,
        agent_address=env.ca.agent_address,
        enroll_address=env.ca.enroll_address,
        bundle_path=None,
        token_file=env.token_file,
        root_fingerprint="ab" * 32,
    )
    async with sidecar(config_from(tmp_path, doc), ManualClock()) as app:
        await wait_for(lambda: app.manager.health.last_error is not None, what="bootstrap failure")
        last = app.manager.health.last_error
        assert last is not None
        assert last.reason == "untrusted_bundle"
        assert "ab" * 32 in last.message
        assert app.manager.snapshot().node is None


async def test_wrong_trust_bundle_is_reported(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        wrong = tmp_path / "wrong.pem"
        wrong.write_bytes(ThrowawayCA.root().cert_pem)
        token = tmp_path / "token"
        token.write_text(await ca.create_join_token(NODE))
        doc = sidecar_document(
            tmp_path,
            agent_address=ca.agent_address,
            enroll_address=ca.enroll_address,
            bundle_path=wrong,
            token_file=token,
        )
        async with sidecar(config_from(tmp_path, doc), ManualClock()) as app:
            await wait_for(lambda: app.manager.health.last_error is not None, what="failure")
            last = app.manager.health.last_error
            assert last is not None
            assert last.reason == "tls_failed"
            assert "does not verify against our trust bundle; check ca.trust_bundle" in (
                last.message
            )
            assert app.manager.ca_reachable() is False
            assert app.manager.snapshot().node is None


async def test_retry_after_from_a_rate_limiting_ca_is_honoured(tmp_path: Path) -> None:
    # One request of credit, refilled every 100 s: the second authenticated call is refused.
    async with running_ca(tmp_path, rate_limit_per_node=0.01, rate_limit_burst=1) as ca:
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(ca.bundle_pem)
        token = tmp_path / "token"
        token.write_text(await ca.create_join_token(NODE))
        await ca.create_entry(WEB, NODE)
        doc = sidecar_document(
            tmp_path,
            agent_address=ca.agent_address,
            enroll_address=ca.enroll_address,
            bundle_path=bundle,
            token_file=token,
        )
        config = config_from(tmp_path, doc)
        clock = ManualClock()
        async with sidecar(config, clock) as app:
            await wait_for(
                lambda: app.manager.health.failures_by_reason().get("rate_limited", 0) >= 1,
                what="rate limited",
            )
            last = app.manager.health.last_error
            assert last is not None
            assert "rate limit" in last.message
            # Our own backoff would retry within 2 s; the CA asked for far longer.
            assert app.manager.retry_at - last.at > 50
            assert config.renewal.retry_max_seconds == 2


async def test_restart_with_an_expired_node_certificate_says_so_at_once(env: Env) -> None:
    config = env.config()
    async with sidecar(config, ManualClock()) as app:
        await wait_for(lambda: ready(app), what="sidecar ready")
        node = app.manager.snapshot().node
        assert node is not None
    await env.ca.stop()
    # Restarted two days later, the CA still down.
    async with sidecar(config, ManualClock(node.svid.not_after + 86400)) as app:
        expected = (
            f"node certificate expired at {utc(node.svid.not_after).isoformat(timespec='seconds')}"
            f"; provide a new join token in {env.token_file}"
        )
        assert (app.manager.problem() or "").startswith(expected)
        assert app.manager.readiness() == (False, app.manager.problem())
        assert app.manager.snapshot().identities == {}
