"""`make run` on a fresh directory: the whole mesh on loopback. A CA, two sidecars and two
sample services come up; requests flow through outbound -> inbound with the caller's SPIFFE
ID seen by the app; a plaintext client and a client with another CA's certificate are
refused and counted by reason; both identities rotate under traffic with no failed request;
everything stops cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_mesh_and_rotates_without_a_failed_request(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--once", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "DEV MODE" in done.stderr  # the throwaway KEK is announced
    # Both sidecars enrolled and hold their identity.
    assert out.count("ready:    yes") == 2
    # Requests flow, and the api app learns who called it from the PROXY v2 header.
    assert "web -> api #1: hello spiffe://example.org/svc/web, this is the api service" in out
    # The protected port refuses plaintext and a foreign CA's certificate, and counts why.
    assert "plaintext HTTP client:                 closed without an answer" in out
    assert re.search(r"another CA's certificate:\s+refused by the sidecar: \S*UNKNOWN_CA", out)
    counted = re.search(r"counted refusals by reason:\s+(.*)", out)
    assert counted is not None
    assert "not_tls=1" in counted.group(1)
    assert "unknown_authority=1" in counted.group(1)
    # Both identities rotated while traffic flowed, and nothing failed.
    assert "rotation: spiffe://example.org/svc/web now serial" in out
    assert "rotation: spiffe://example.org/svc/api now serial" in out
    summary = re.search(r"summary: (\d+) requests, (\d+) failed, (\d+) identity rotations", out)
    assert summary is not None
    assert int(summary.group(1)) >= 5
    assert summary.group(2) == "0"
    assert "FAILED" not in out
