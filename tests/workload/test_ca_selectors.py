"""The CA refuses Unix selectors the sidecar could never match, so that a typo surfaces at
`meshtls-ca entry create --selector ...` instead of as a silent PERMISSION_DENIED later."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from meshtls.v1 import admin_pb2
from tests.support.ca import running_ca


async def test_unix_selectors_are_checked_when_an_entry_is_created(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        good = ["unix:uid:1000", "unix:gid:0", "unix:user:www-data", "unix:group:web.ops"]
        entry_id = await ca.create_entry("spiffe://example.org/ok", "n1", selectors=good)
        async with ca.admin() as stub:
            listed = await stub.ListEntries(admin_pb2.ListEntriesRequest(node_name="n1"))
        assert [list(e.selectors) for e in listed.entries if e.id == entry_id] == [good]
        # Other kinds pass through untouched (a future attestor may use them).
        await ca.create_entry("spiffe://example.org/k8s", "n1", selectors=["k8s:ns:web"])
        for bad in ["unix:uid:web", "unix:uid:", "unix:pid:42", "unix:user:", "unix:gid:-1"]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ca.create_entry("spiffe://example.org/bad", "n1", selectors=[bad])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert "unix:uid:<number>" in (refused.value.details() or ""), bad
