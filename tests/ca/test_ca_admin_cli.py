"""The real `meshtls-ca` admin commands, run as subprocesses against a running CA's
--data-dir the way an operator types them: what they print, what they change in the
database, and how they refuse bad input (non-zero exit, one clear line on stderr, nothing
changed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from meshtls.identity.pem import certs_from_pem
from meshtls.v1 import agent_pb2_grpc
from tests.ca.helpers import (
    CliResult,
    assert_one_line_refusal,
    certificate,
    db_state,
    enroll_node,
    enroll_with,
    join_token,
    key_and_csr,
    node_channel,
    run_cli,
    sign_one,
)
from tests.support.ca import RunningCA, running_ca

pytestmark = pytest.mark.asyncio(loop_scope="module")

TD = "example.org"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ca(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningCA]:
    async with running_ca(tmp_path_factory.mktemp("admin-cli"), trust_domain=TD) as running:
        yield running


async def cli(ca: RunningCA, *args: str) -> CliResult:
    """`meshtls-ca ARGS --data-dir <the CA's data dir>`, as an operator types it."""
    return await run_cli(*args, "--data-dir", ca.data_dir)


async def cli_ok(ca: RunningCA, *args: str) -> str:
    result = await cli(ca, *args)
    assert result.returncode == 0, f"meshtls-ca {' '.join(args)} failed: {result.stderr}"
    return result.stdout


async def cli_json(ca: RunningCA, *args: str) -> Any:
    return json.loads(await cli_ok(ca, *args, "--json"))


# token ---------------------------------------------------------------------------------


async def test_token_create_prints_only_the_token(ca: RunningCA) -> None:
    result = await cli(ca, "token", "create", "--node", "cli-token")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold only the token: {result.stdout!r}"
    token = lines[0]
    assert token.startswith("mjt_")
    assert " " not in token
    assert token not in result.stderr
    assert "cli-token" in result.stderr
    assert "single use" in result.stderr
    stored = join_token(ca, token)
    assert stored is not None
    assert stored.node_name == "cli-token"
    assert stored.used_at is None

    enrolled = await enroll_with(ca, token, key_and_csr()[1])
    assert enrolled.node_name == "cli-token"


# entry ---------------------------------------------------------------------------------


async def test_entry_create_list_delete(ca: RunningCA) -> None:
    spiffe_id = f"spiffe://{TD}/svc/cli-entry"
    created = await cli_json(
        ca,
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--node",
        "cli-entry-node",
        "--dns",
        "cli.internal",
        "--dns",
        "cli2.internal",
        "--ttl",
        "30m",
        "--selector",
        "unix:uid:1000",
    )
    assert created["spiffe_id"] == spiffe_id
    assert created["node_name"] == "cli-entry-node"
    assert created["dns_names"] == ["cli.internal", "cli2.internal"]
    assert created["ttl_seconds"] == 1800
    assert created["selectors"] == ["unix:uid:1000"]
    entry_id = created["id"]
    assert any(e.id == entry_id for e in db_state(ca).entries)

    listed, by_node, by_other_node, table = await asyncio.gather(
        cli_json(ca, "entry", "list"),
        cli_json(ca, "entry", "list", "--node", "cli-entry-node"),
        cli_json(ca, "entry", "list", "--node", "nobody-here"),
        cli_ok(ca, "entry", "list", "--node", "cli-entry-node"),
    )
    assert entry_id in [e["id"] for e in listed]
    assert [e["id"] for e in by_node] == [entry_id]
    assert by_other_node == []
    assert entry_id in table
    assert spiffe_id in table
    assert "1800s" in table

    deleted = await cli_ok(ca, "entry", "delete", entry_id)
    assert entry_id in deleted
    assert await cli_json(ca, "entry", "list", "--node", "cli-entry-node") == []
    assert all(e.id != entry_id for e in db_state(ca).entries)


# cert ----------------------------------------------------------------------------------


async def test_cert_list_show_and_revoke(ca: RunningCA) -> None:
    node = await enroll_node(ca, "cli-cert")
    entry = await ca.create_entry(f"spiffe://{TD}/svc/cli-cert", "cli-cert")
    async with node_channel(ca, node) as channel:
        await sign_one(agent_pb2_grpc.AgentServiceStub(channel), entry, key_and_csr()[1])

    listed, shown, as_json = await asyncio.gather(
        cli_json(ca, "cert", "list", "--node", "cli-cert"),
        cli_ok(ca, "cert", "show", node.serial),
        cli_json(ca, "cert", "show", node.serial),
    )
    assert {c["kind"] for c in listed} == {"node", "workload"}
    assert {c["node_name"] for c in listed} == {"cli-cert"}
    assert node.serial in [c["serial"] for c in listed]
    assert all(c["status"] == "valid" for c in listed)

    record = certificate(ca, node.serial)
    assert record is not None
    assert node.serial in shown
    assert record.fingerprint_sha256 in shown
    assert certs_from_pem(shown[shown.index("-----BEGIN") :].encode()) == [node.cert]
    assert as_json["pem"] == record.pem
    assert as_json["status"] == "valid"

    revoked = await cli_ok(ca, "cert", "revoke", node.serial, "--reason", "key compromise")
    assert "revoked" in revoked
    assert node.serial in revoked
    after = await cli_json(ca, "cert", "show", node.serial)
    assert after["status"] == "revoked"
    assert after["revocation_reason"] == "key compromise"
    stored = certificate(ca, node.serial)
    assert stored is not None
    assert stored.revoked_at is not None
    assert stored.revocation_reason == "key compromise"


# node ----------------------------------------------------------------------------------


async def test_node_list_and_ban(ca: RunningCA) -> None:
    node = await enroll_node(ca, "cli-node")
    as_json, table = await asyncio.gather(cli_json(ca, "node", "list"), cli_ok(ca, "node", "list"))
    listed = {n["name"]: n for n in as_json}
    assert listed["cli-node"]["status"] == "active"
    assert listed["cli-node"]["current_serial"] == node.serial
    assert "cli-node" in table
    assert node.serial in table

    banned = await cli_ok(ca, "node", "ban", "cli-node", "--reason", "stolen")
    assert "banned node cli-node" in banned
    listed = {n["name"]: n for n in await cli_json(ca, "node", "list")}
    assert listed["cli-node"]["status"] == "banned"
    stored = next(n for n in db_state(ca).nodes if n.name == "cli-node")
    assert stored.status == "banned"
    record = certificate(ca, node.serial)
    assert record is not None
    assert record.revoked_at is not None


# authority, bundle, status ---------------------------------------------------------------


async def test_authority_list(ca: RunningCA) -> None:
    listed, table = await asyncio.gather(
        cli_json(ca, "authority", "list"), cli_ok(ca, "authority", "list")
    )
    assert ca.server is not None
    assert ca.server.ctx is not None
    stored = {a.id: a for a in ca.server.ctx.trust.keyring.authorities}
    assert {a["id"] for a in listed} == set(stored)
    assert sorted((a["kind"], a["state"]) for a in listed) == [
        ("intermediate", "active"),
        ("root", "active"),
    ]
    for a in listed:
        assert a["fingerprint_sha256"] == stored[a["id"]].fingerprint_sha256
    assert all(a["id"] in table for a in listed)


async def test_bundle_show(ca: RunningCA) -> None:
    shown = await cli_ok(ca, "bundle", "show")
    assert shown.encode() == ca.bundle_pem


async def test_status(ca: RunningCA) -> None:
    text, status = await asyncio.gather(cli_ok(ca, "status"), cli_json(ca, "status"))
    state = db_state(ca)
    counts = state.counts()
    assert f"trust domain:   {TD}" in text
    assert status["trust_domain"] == TD
    assert int(status.get("nodes", 0)) == counts["nodes"]
    assert int(status.get("entries", 0)) == counts["entries"]
    assert status["agent_address"] == ca.agent_address
    assert status["enrollment_address"] == ca.enroll_address
    assert f"nodes: {counts['nodes']}  entries: {counts['entries']}" in text
    assert len(status["authorities"]) == 2


# bad admin input -----------------------------------------------------------------------


async def test_malformed_spiffe_id(ca: RunningCA) -> None:
    before = db_state(ca)
    result = await cli(
        ca, "entry", "create", "--spiffe-id", "https://example.org/x", "--node", "n1"
    )
    assert_one_line_refusal(result, "spiffe://")
    assert db_state(ca) == before


async def test_foreign_trust_domain(ca: RunningCA) -> None:
    before = db_state(ca)
    result = await cli(
        ca, "entry", "create", "--spiffe-id", "spiffe://other.org/svc/x", "--node", "n1"
    )
    assert_one_line_refusal(result, "not in trust domain example.org")
    assert db_state(ca) == before


@pytest.mark.parametrize("ttl", ["10s", "48h"])
async def test_ttl_out_of_range(ca: RunningCA, ttl: str) -> None:
    before = db_state(ca)
    result = await cli(
        ca, "entry", "create", "--spiffe-id", f"spiffe://{TD}/svc/ttl", "--node", "n1", "--ttl", ttl
    )
    assert_one_line_refusal(result, "out of range")
    assert db_state(ca) == before


@pytest.mark.parametrize("action", ["show", "revoke"])
async def test_unknown_serial(ca: RunningCA, action: str) -> None:
    before = db_state(ca)
    result = await cli(ca, "cert", action, "0123456789abcdef")
    assert_one_line_refusal(result, "123456789abcdef")
    assert (
        "NOT_FOUND" in result.stderr
        or "not known" in result.stderr
        or "no certificate" in result.stderr
    )
    assert db_state(ca) == before


async def test_not_a_serial(ca: RunningCA) -> None:
    result = await cli(ca, "cert", "show", "not-hex")
    assert_one_line_refusal(result, "not-hex")


async def test_duplicate_entry(ca: RunningCA) -> None:
    args = ("entry", "create", "--spiffe-id", f"spiffe://{TD}/svc/dup", "--node", "dup-node")
    await cli_ok(ca, *args)
    before = db_state(ca)
    result = await cli(ca, *args)
    assert_one_line_refusal(result, "already exists")
    assert db_state(ca) == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("token", "create", "--node", "n1", "--ttl", "30d"), "exceeds the maximum"),
        (("token", "create", "--node", "bad name!"), "node name 'bad name!'"),
        (("entry", "delete", "0" * 32), "0" * 32),
        (("node", "ban", "no-such-node"), "no-such-node"),
    ],
)
async def test_other_refused_admin_commands(
    ca: RunningCA, args: tuple[str, ...], expected: str
) -> None:
    before = db_state(ca)
    result = await cli(ca, *args)
    assert_one_line_refusal(result, expected)
    assert db_state(ca) == before
