"""Real sidecars for the proxy tests: `SidecarApp`s enrolled with a real CA (see
tests/support/ca.py) running the proxy sections they are given, and their metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sidecar.app import SidecarApp
from tests.sidecar.helpers import config_from, sidecar_document, wait_for
from tests.support.ca import RunningCA


@asynccontextmanager
async def real_sidecar(
    tmp_path: Path,
    ca: RunningCA,
    node: str,
    *,
    renewal: dict[str, Any] | None = None,
    **proxy: Any,
) -> AsyncIterator[SidecarApp]:
    """A `SidecarApp` for `node`, enrolled with `ca` by join token, with the proxy
    sections `proxy` (inbound=[...], outbound=[...]); ready when yielded."""
    home = tmp_path / node
    home.mkdir()
    bundle = home / "bundle.pem"
    bundle.write_bytes(ca.bundle_pem)
    token = home / "token"
    token.write_text(await ca.create_join_token(node))
    doc = sidecar_document(
        home,
        agent_address=ca.agent_address,
        enroll_address=ca.enroll_address,
        bundle_path=bundle,
        node=node,
        token_file=token,
        renewal=renewal,
    )
    doc.update(proxy)
    app = SidecarApp(config_from(home, doc))
    await app.start()
    try:
        await wait_for(lambda: app.manager.readiness()[0], within=20, what=f"{node} ready")
        yield app
    finally:
        await app.stop()


def sample(app: SidecarApp, name: str, **labels: str) -> float:
    """A sample of the sidecar's own metrics registry (0 when absent)."""
    value = app.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def total(app: SidecarApp, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels` (any other labels)."""
    found = 0.0
    for metric in app.metrics.registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                found += s.value
    return found
