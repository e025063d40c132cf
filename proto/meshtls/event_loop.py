"""The event loop the sidecar and the CA server run on: uvloop when it is installed, else
asyncio's own.

uvloop makes the proxy's reads, writes and accepts markedly cheaper, and the CA's gRPC
calls too (`meshtls-ca serve`: about 8 % less CPU per certificate, 1-CSR calls up to a
third faster; docs/BENCHMARKS.md). Set `MESHTLS_EVENT_LOOP=asyncio` to use the standard
loop anyway (to compare, or to debug).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "MESHTLS_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default loop."""
    if os.environ.get(ENV, "uvloop").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop chosen by `loop_factory()`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
