"""Project-wide rules: generated code matches proto/, and the two programs never import
each other (what both need lives in `meshtls`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protobuf_code_matches_the_proto_files() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "gen.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("source", "generated"),
    [
        ("meshtls/v1/types.proto", "meshtls/v1/types_pb2.py"),
        ("spiffe/workloadapi.proto", "meshtls/spiffe/workloadapi_pb2.py"),
    ],
)
def test_drift_is_detected(tmp_path: Path, source: str, generated: str) -> None:
    """The check above can fail: a copy of proto/ with an edited .proto is reported stale."""
    import shutil

    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", copy, ignore=shutil.ignore_patterns("__pycache__"))
    edited = copy / source
    edited.write_text(edited.read_text() + "\nmessage DriftProbe {}\n")
    done = subprocess.run(
        [sys.executable, str(copy / "gen.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "stale" in done.stderr
    assert generated in done.stderr


@pytest.mark.parametrize(
    ("package", "forbidden"), [("ca_server", "sidecar"), ("sidecar", "ca_server")]
)
def test_programs_do_not_import_each_other(package: str, forbidden: str) -> None:
    """Import every module of `package` in a fresh interpreter; none may pull in `forbidden`."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] == {forbidden!r})\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{package} imports {done.stdout.strip()}"
