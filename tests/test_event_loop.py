"""meshtls.event_loop: the CA server and the sidecar run on uvloop unless told otherwise."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from meshtls import event_loop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.run(_loop_type()) is uvloop.Loop


def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.loop_factory() is None
    assert event_loop.run(_loop_type()) is not uvloop.Loop
