"""Helpers for the sidecar tests: polling, config files, HTTP GETs to the status server."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from meshtls.identity.ids import SpiffeId
from sidecar.config import SidecarConfig, load_config
from sidecar.identity.keys import PrivateKey, new_private_key
from sidecar.identity.model import Entry, Svid, TrustBundle, WorkloadIdentity
from tests.support.pki import ThrowawayCA

Predicate = Callable[[], bool | Awaitable[bool]]
POLL_INTERVAL = 0.02


async def wait_for(
    predicate: Predicate,
    within: float = 10.0,
    *,
    tick: Callable[[], Awaitable[None]] | None = None,
    what: str = "condition",
) -> None:
    """Poll `predicate` until true; run `tick` (e.g. advance a ManualClock) between polls.

    Fails with `what` after `within` seconds of real time.
    """
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        if tick is not None:
            await tick()
        await asyncio.sleep(POLL_INTERVAL)


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def sidecar_document(
    tmp_path: Path,
    *,
    agent_address: str,
    enroll_address: str,
    bundle_path: Path | None,
    node: str = "web-1",
    trust_domain: str = "example.org",
    token_file: Path | None = None,
    files: list[dict[str, Any]] | None = None,
    renewal: dict[str, Any] | None = None,
    **ca_extra: Any,
) -> dict[str, Any]:
    ca: dict[str, Any] = {"address": agent_address, "enroll_address": enroll_address}
    if bundle_path is not None:
        ca["trust_bundle"] = str(bundle_path)
    if token_file is not None:
        ca["join_token_file"] = str(token_file)
    ca.update(ca_extra)
    return {
        "trust_domain": trust_domain,
        "node": node,
        "state_dir": str(tmp_path / "state"),
        "ca": ca,
        "files": files or [],
        "status": {"listen": "127.0.0.1:0"},
        "renewal": renewal
        or {"retry_initial_seconds": 1, "retry_max_seconds": 2, "refresh_seconds": 300},
    }


def config_from(
    tmp_path: Path, document: dict[str, Any], name: str = "sidecar.yaml"
) -> SidecarConfig:
    return load_config(write_config(tmp_path / name, document), env={})


async def http_get(url: str) -> tuple[int, bytes]:
    """GET `url` (http://host:port/path) with a raw asyncio connection."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    try:
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


# -- throwaway PKI as the sidecar's value objects ---------------------------------------


def make_bundle(
    root: ThrowawayCA, version: int = 1, trust_domain: str = "example.org"
) -> TrustBundle:
    return TrustBundle(trust_domain, (root.cert,), version)


def make_svid(
    issuer: ThrowawayCA,
    spiffe_id: str,
    *,
    not_before: float | None = None,
    not_after: float | None = None,
    key: PrivateKey | None = None,
) -> Svid:
    """An X509-SVID issued by `issuer` (chain without the root), with its key."""
    key = key or new_private_key()
    leaf = issuer.leaf(spiffe_id, key=key, not_before=not_before, not_after=not_after)
    chain = (leaf.cert, *(c for c in leaf.parents if c.subject != c.issuer))
    return Svid(SpiffeId.parse(spiffe_id), chain, key)


def make_identity(
    issuer: ThrowawayCA,
    spiffe_id: str,
    entry_id: str = "entry-1",
    *,
    issued_at: float | None = None,
    not_before: float | None = None,
    not_after: float | None = None,
) -> WorkloadIdentity:
    svid = make_svid(issuer, spiffe_id, not_before=not_before, not_after=not_after)
    entry = Entry(entry_id, SpiffeId.parse(spiffe_id), (), 3600)
    now = time.time() if issued_at is None else issued_at
    return WorkloadIdentity(entry, svid, now, (svid.not_before + svid.not_after) / 2)
