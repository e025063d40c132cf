"""The sidecar depends on the shared `meshtls` package only, never on the CA's code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sidecar

MODULES = sorted(
    "sidecar." + ".".join(p.relative_to(Path(sidecar.__file__).parent).with_suffix("").parts)
    for p in Path(sidecar.__file__).parent.rglob("*.py")
    if p.name not in {"__init__.py", "__main__.py"}
)


def test_sidecar_never_imports_ca_server() -> None:
    assert "sidecar.identity.manager" in MODULES
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'ca_server' or m.startswith('ca_server.'))\n"
        "print(' '.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"sidecar imports CA modules: {result.stdout}{result.stderr}"
