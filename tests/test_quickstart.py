"""`make run` on a fresh directory: a CA and a sidecar come up, the sidecar enrolls and
holds every identity, the files are written, and both processes stop cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_enrolls_and_prints_identities(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--once", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "ready:    yes" in out
    assert "spiffe://example.org/svc/web" in out
    assert "spiffe://example.org/svc/api" in out
    assert "bundle.pem, svid.pem, svid_key.pem" in out
    assert "DEV MODE" in done.stderr  # the throwaway KEK is announced
    files = tmp_path / "sidecar" / "files" / "web"
    assert (files / "svid_key.pem").stat().st_mode & 0o077 == 0
