"""Fixtures of the proxy tests: a `Mesh` (throwaway PKI + published snapshots + the proxy
services started on it, stopped at the end) and the proxy's log records."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.proxy.helpers import LogRecords, Mesh


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    world = Mesh(tmp_path)
    try:
        yield world
    finally:
        await world.close()


@pytest.fixture
def proxy_logs() -> Iterator[LogRecords]:
    handler = LogRecords()
    logger = logging.getLogger("sidecar.proxy")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
