"""`meshtls-sidecar fetch` against a real CA, on a host where no sidecar runs: the real
command line in a child process, files checked with openssl."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from meshtls.clock import ManualClock
from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import certs_from_pem, certs_to_pem
from meshtls.identity.x509 import spiffe_id_of
from sidecar.fetch import fetch_identity
from sidecar.identity.keys import key_from_pem, key_matches
from tests.sidecar.helpers import write_config
from tests.workload.helpers import TTL, Env

pytestmark = pytest.mark.slow

WEB = "spiffe://example.org/svc/web"


async def fetch(config: Path, spiffe_id: str, out: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "fetch",
        "--config",
        str(config),
        "--spiffe-id",
        spiffe_id,
        "--out",
        str(out),
        "--timeout",
        "20",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out_b.decode(), err_b.decode()


def check_files(out: Path, bundle_pem: bytes, spiffe_id: str) -> str:
    """The three files are complete and consistent; returns the leaf's serial."""
    chain = certs_from_pem((out / "svid.pem").read_bytes())
    assert len(chain) >= 2, "svid.pem holds the leaf and its intermediate"
    assert str(spiffe_id_of(chain[0])) == spiffe_id
    key_path = out / "svid_key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_matches(key_from_pem(key_path.read_bytes()), chain[0])
    assert (out / "bundle.pem").read_bytes() == bundle_pem
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", "bundle.pem", "-untrusted", "svid.pem", "svid.pem"],
        cwd=out,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return format(chain[0].serial_number, "x")


async def test_fetch_enrolls_signs_writes_and_then_works_from_state(env: Env) -> None:
    await env.ca.create_entry(WEB, "web-1", ttl_seconds=TTL)
    config = write_config(env.tmp_path / "sidecar.yaml", env.document())
    roots = (await env.ca.bundle()).root_certificates
    roots_pem = certs_to_pem(x509.load_der_x509_certificate(r) for r in roots)
    code, stdout, stderr = await fetch(config, WEB, env.tmp_path / "out1")
    assert code == 0, stderr
    assert "from ca" in stdout
    serial = check_files(env.tmp_path / "out1", roots_pem, WEB)
    assert (env.tmp_path / "state" / "node.json").exists(), "the state is kept for next time"

    await env.ca.stop()  # a CA outage: the stored certificate is still fresh
    code, stdout, stderr = await fetch(config, WEB, env.tmp_path / "out2")
    assert code == 0, stderr
    assert "from state" in stdout
    assert check_files(env.tmp_path / "out2", roots_pem, WEB) == serial


async def test_fetch_fails_with_a_message_an_operator_can_act_on(env: Env) -> None:
    await env.ca.create_entry(WEB, "web-1", ttl_seconds=TTL)
    config = write_config(env.tmp_path / "sidecar.yaml", env.document())
    code, _, stderr = await fetch(config, "spiffe://example.org/svc/unknown", env.tmp_path / "o")
    assert code == 1
    assert "no registration entry for spiffe://example.org/svc/unknown" in stderr
    assert "meshtls-ca entry create" in stderr
    assert not (env.tmp_path / "o" / "svid.pem").exists()

    code, _, stderr = await fetch(config, "https://not-spiffe", env.tmp_path / "o")
    assert code == 2
    assert "--spiffe-id" in stderr

    await env.ca.stop()
    doc = env.document()
    doc["state_dir"] = str(env.tmp_path / "empty-state")
    other = write_config(env.tmp_path / "other.yaml", doc)
    code, _, stderr = await fetch(other, WEB, env.tmp_path / "o")
    assert code == 1
    assert f"cannot obtain {WEB} from the CA" in stderr
    assert not (env.tmp_path / "o" / "svid.pem").exists()


async def test_fetch_renews_a_stored_certificate_that_is_due(env: Env) -> None:
    await env.ca.create_entry(WEB, "web-1", ttl_seconds=TTL)
    config = env.config()
    clock = ManualClock()
    first = await fetch_identity(config, SpiffeId.parse(WEB), env.tmp_path / "a", clock=clock)
    assert first.source == "ca"
    again = await fetch_identity(config, SpiffeId.parse(WEB), env.tmp_path / "b", clock=clock)
    assert (again.source, again.serial) == ("state", first.serial)
    # Past the latest renewal point a running sidecar could choose (fraction + jitter).
    await clock.advance(TTL * 0.61)
    renewed = await fetch_identity(config, SpiffeId.parse(WEB), env.tmp_path / "c", clock=clock)
    assert renewed.source == "ca"
    assert renewed.serial != first.serial
    # The renewal was persisted. (Read on real time: the CA dated the new certificate by
    # the real clock, which the advanced ManualClock is ahead of.)
    latest = await fetch_identity(config, SpiffeId.parse(WEB), env.tmp_path / "d")
    assert (latest.source, latest.serial) == ("state", renewed.serial)
