"""Fixtures of the Kubernetes enrollment tests: the stand-in API server (tests/k8s/apiserver.py:
no real Kubernetes API server can run here) and the CA's `kubernetes` config pointing at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ca_server.config import KubernetesConfig
from tests.k8s.apiserver import StandInApiServer

AUDIENCE = "meshtls-ca"
AGENT_ACCOUNT = "meshtls/meshtls-agent"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[StandInApiServer]:
    server = StandInApiServer(tmp_path / "apiserver")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def kubernetes_config(api: StandInApiServer, **overrides: Any) -> KubernetesConfig:
    """The CA's `kubernetes` section for the stand-in, as a pod of the CA would have it."""
    base = KubernetesConfig(
        api_server=api.url,
        ca_file=api.ca_file,
        token_file=api.token_file,
        audience=AUDIENCE,
        allowed_service_accounts=(AGENT_ACCOUNT,),
    )
    return replace(base, **overrides)
