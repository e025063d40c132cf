"""Fixtures for the Workload API, SDS and fetch tests (see helpers.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.ca import running_ca
from tests.workload.helpers import NODE, Env


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory (pytest's tmp_path can exceed the 107-byte socket path limit) that
    other uids can enter, for the tests that drop privileges."""
    path = Path(tempfile.mkdtemp(prefix="mtls-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def env(tmp_path: Path, socket_dir: Path) -> AsyncIterator[Env]:
    async with running_ca(tmp_path) as ca:
        bundle_path = tmp_path / "bundle.pem"
        bundle_path.write_bytes(ca.bundle_pem)
        token_file = tmp_path / "token"
        token_file.write_text(await ca.create_join_token(NODE) + "\n")
        yield Env(tmp_path, ca, bundle_path, token_file, socket_dir)
