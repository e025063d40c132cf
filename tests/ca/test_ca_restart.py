"""The CA across restarts: same roots, same records, enrolled nodes keep renewing; CA keys
are only ever stored encrypted; and the wrong KEK stops the CA with a clear ConfigError."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from ca_server.app import CAServer
from ca_server.authority.kek import generate_kek_file, load_kek_file
from ca_server.authority.keys import CAPrivateKey, decrypt_private_key, public_key_der
from ca_server.errors import ConfigError
from meshtls.v1 import agent_pb2, agent_pb2_grpc
from tests.ca.helpers import (
    RPC_TIMEOUT,
    NodeIdentity,
    db_state,
    der_chain,
    enroll_node,
    key_and_csr,
    key_pem,
    node_channel,
    rpc_error,
    sign_one,
)
from tests.support.ca import RunningCA, running_ca


async def _renew(ca: RunningCA, node: NodeIdentity) -> NodeIdentity:
    key, csr = key_and_csr()
    async with node_channel(ca, node) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        answer = await stub.RenewNode(agent_pb2.RenewNodeRequest(csr=csr), timeout=RPC_TIMEOUT)
    return NodeIdentity(node.name, key_pem(key), der_chain(answer.node_certificate.certificates))


async def test_restart_keeps_roots_records_and_enrolled_nodes(
    tmp_path: Path, database_url: str
) -> None:
    async with running_ca(tmp_path, database_url=database_url) as ca:
        node = await enroll_node(ca, "restart-1")
        entry = await ca.create_entry(f"spiffe://{ca.trust_domain}/svc/restart", "restart-1")
        async with node_channel(ca, node) as channel:
            await sign_one(agent_pb2_grpc.AgentServiceStub(channel), entry, key_and_csr()[1])
        roots_before = ca.bundle_pem
        bundle_before = await ca.bundle()
        state_before = db_state(ca)

        await ca.stop()
        # The outage is real: the agent listener is gone.
        async with node_channel(ca, node) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            error = await rpc_error(
                stub.ListIdentities(agent_pb2.ListIdentitiesRequest(), timeout=2)
            )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        await ca.start()

        assert ca.bundle_pem == roots_before
        bundle_after = await ca.bundle()
        assert list(bundle_after.root_certificates) == list(bundle_before.root_certificates)
        assert bundle_after.version == bundle_before.version
        state_after = db_state(ca)
        assert set(state_before.certificates) <= set(state_after.certificates)
        assert state_after.nodes == state_before.nodes
        assert state_after.entries == state_before.entries
        assert all(event in state_after.audit for event in state_before.audit)
        # The only new certificate is the CA's own server certificate for this run.
        new = set(state_after.certificates) - set(state_before.certificates)
        assert [c.kind for c in new] == ["ca-server"]

        renewed = await _renew(ca, node)
        assert renewed.serial != node.serial
        async with node_channel(ca, renewed) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            listed = await stub.ListIdentities(
                agent_pb2.ListIdentitiesRequest(), timeout=RPC_TIMEOUT
            )
            signed = await sign_one(stub, entry, key_and_csr()[1])
        assert [e.id for e in listed.entries] == [entry]
        assert signed.identities[0].spiffe_id.endswith("/svc/restart")


def _ca_keys(ca: RunningCA) -> list[CAPrivateKey]:
    """Every CA private key, decrypted with the dev KEK, checked against its certificate."""
    assert ca.server is not None
    assert ca.server.ctx is not None
    kek = load_kek_file(ca.config.dev_kek_path)
    keyring = ca.server.ctx.trust.keyring
    keys = []
    for authority in keyring.authorities:
        keys.append(decrypt_private_key(authority, kek))
    signer_public = public_key_der(keyring.signer.cert.public_key())
    assert signer_public in {public_key_der(k.public_key()) for k in keys}
    return keys


def _encodings(key: CAPrivateKey) -> dict[str, bytes]:
    """Every plaintext form a careless implementation might store."""
    plain = serialization.NoEncryption()
    forms = {
        "pkcs8-der": key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, plain
        ),
        "pkcs8-pem": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, plain
        ),
    }
    with contextlib.suppress(ValueError):  # not every key type has a traditional form
        forms["traditional-der"] = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, plain
        )
    return forms


async def test_the_database_never_holds_a_plaintext_ca_key(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        keys = _ca_keys(ca)
        assert len(keys) == 2, "a root and an intermediate, both with our keys"
        await enroll_node(ca, "keys-1")
        db_file = ca.config.data_dir / "ca.db"
        connection = sqlite3.connect(db_file)
        try:
            rows = connection.execute("SELECT * FROM authorities").fetchall()
            tables = [
                name
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'"
                )
            ]
            everything = [
                value
                for table in tables
                for row in connection.execute(f'SELECT * FROM "{table}"')  # noqa: S608
                for value in row
            ]
        finally:
            connection.close()
        raw_files = b"".join(
            path.read_bytes() for path in db_file.parent.glob("ca.db*") if path.is_file()
        )

    assert len(rows) == 2
    needles = [b"BEGIN PRIVATE KEY", b"BEGIN EC PRIVATE KEY"]
    for key in keys:
        needles += list(_encodings(key).values())
    authority_values = [v for row in rows for v in row]
    for values, where in ((authority_values, "authorities"), (everything, "any table")):
        for value in values:
            blob = value if isinstance(value, bytes) else str(value).encode()
            for needle in needles:
                assert needle not in blob, f"plaintext CA key material in {where}"
    for needle in needles:
        assert needle not in raw_files, "plaintext CA key material in the SQLite files"


async def test_a_wrong_kek_stops_the_ca_with_a_clear_config_error(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        config = ca.config
    other_kek = tmp_path / "other.kek"
    generate_kek_file(other_kek)
    wrong = CAServer(dataclasses.replace(config, kek_file=other_kek, dev=False))
    try:
        with pytest.raises(ConfigError) as caught:
            await wrong.start()
    finally:
        await wrong.stop()
    message = str(caught.value)
    assert "wrong KEK" in message
    assert "start the CA with the KEK it was initialised with" in message
    assert load_kek_file(other_kek).id in message, "the message names which KEK was tried"
    assert other_kek.read_text().strip() not in message, "never the KEK itself"

    # Nothing was damaged: the right KEK still starts the CA on the same data.
    async with running_ca(tmp_path) as again:
        assert again.bundle_pem
        await enroll_node(again, "after-wrong-kek")
