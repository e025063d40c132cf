"""`meshtls-ca authority import` on a running upstream-mode CA: an operator intermediate
made outside the CA (tests/support/pki.py) is validated, stored under the KEK, audited,
and becomes the signer at once when it chains to the root peers already trust; one that
brings a new root is published in the bundle at once and signs only after the propagation
time. Bad imports are refused with a message that says what is wrong, and change nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc

from ca_server.config import UpstreamConfig
from meshtls.identity.pem import certs_from_der
from meshtls.identity.x509 import fingerprint_sha256
from meshtls.v1 import admin_pb2
from tests.ca.helpers import enroll_node, rpc_error, run_cli, wait_for
from tests.support.ca import RunningCA, running_ca
from tests.support.pki import DAY, ThrowawayCA


def _upstream(tmp_path: Path, root: ThrowawayCA) -> tuple[UpstreamConfig, ThrowawayCA]:
    first = root.intermediate(common_name="Corp issuing CA 1", not_after=time.time() + 30 * DAY)
    cert_file, key_file = first.write(tmp_path / "upstream", "first")
    chain_file = tmp_path / "upstream" / "chain.pem"
    chain_file.write_bytes(root.cert_pem)
    return UpstreamConfig(cert_file, key_file, chain_file), first


def _signer_cert_fp(ca: RunningCA) -> str:
    assert ca.server is not None
    assert ca.server.ctx is not None
    return fingerprint_sha256(ca.server.ctx.trust.keyring.signer.cert)


async def _journal(ca: RunningCA) -> dict[str, admin_pb2.AuthorityRecord]:
    async with ca.admin() as stub:
        listing = await stub.ListAuthorities(admin_pb2.ListAuthoritiesRequest())
    return {a.fingerprint_sha256: a for a in listing.authorities}


async def test_an_intermediate_under_the_same_root_signs_at_once(tmp_path: Path) -> None:
    root = ThrowawayCA.root(common_name="Corp Root")
    upstream, first = _upstream(tmp_path, root)
    async with running_ca(tmp_path, upstream=upstream) as ca:
        bundle_before = list((await ca.bundle()).root_certificates)
        second = root.intermediate(
            common_name="Corp issuing CA 2", not_after=time.time() + 90 * DAY
        )
        cert_file, key_file = second.write(tmp_path / "new", "second")
        done = await run_cli(
            "authority", "import", "--cert", cert_file, "--key", key_file,
            "--data-dir", ca.data_dir,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "it is the signer now" in done.stdout
        journal = await _journal(ca)
        assert journal[fingerprint_sha256(second.cert)].state == "active"
        assert journal[fingerprint_sha256(first.cert)].state == "retired"
        assert _signer_cert_fp(ca) == fingerprint_sha256(second.cert)
        # Peers already trust the root: the bundle is unchanged.
        assert list((await ca.bundle()).root_certificates) == bundle_before
        enrolled = await enroll_node(ca, "web-1")
        assert enrolled.chain[1] == second.cert
        enrolled.chain[0].verify_directly_issued_by(second.cert)

        assert ca.server is not None
        assert ca.server.ctx is not None
        ctx = ca.server.ctx
        with ctx.store.read() as tx:
            stored = next(
                a
                for a in tx.list_authorities()
                if a.fingerprint_sha256 == fingerprint_sha256(second.cert)
            )
            audit = tx.list_audit_events(limit=10, action="authority.import")
        assert stored.encrypted_key is not None
        assert second.key_pem not in stored.encrypted_key  # stored under the KEK only
        assert [e.subject for e in audit] == [stored.id]
        assert audit[0].actor == "admin:unix"


async def test_an_intermediate_with_a_new_root_is_published_first_and_signs_later(
    tmp_path: Path,
) -> None:
    old_root = ThrowawayCA.root(common_name="Corp Root 2024")
    upstream, first = _upstream(tmp_path, old_root)
    new_root = ThrowawayCA.root(common_name="Corp Root 2025")
    second = new_root.intermediate(
        common_name="Corp issuing CA 2025", not_after=time.time() + 90 * DAY
    )
    async with running_ca(tmp_path, upstream=upstream, rotation_min_propagation=2.0) as ca:
        async with ca.admin() as stub:
            done = await stub.ImportAuthority(
                admin_pb2.ImportAuthorityRequest(
                    certificate_pem=second.cert_pem,
                    private_key_pem=second.key_pem,
                    chain_pem=new_root.cert_pem,
                )
            )
        assert done.imported.state == "prepared"
        assert done.new_root.fingerprint_sha256 == fingerprint_sha256(new_root.cert)
        assert done.HasField("activates_at")
        # The new root is in the bundle at once; the old one signs meanwhile.
        roots = certs_from_der(list((await ca.bundle()).root_certificates))
        assert set(roots) == {old_root.cert, new_root.cert}
        assert _signer_cert_fp(ca) == fingerprint_sha256(first.cert)

        async def new_one_signs() -> bool:
            return _signer_cert_fp(ca) == fingerprint_sha256(second.cert)

        await wait_for(new_one_signs, within=15, what="the imported intermediate to sign")
        journal = await _journal(ca)
        assert journal[fingerprint_sha256(new_root.cert)].state == "active"
        assert journal[fingerprint_sha256(old_root.cert)].state == "retired"
        enrolled = await enroll_node(ca, "web-1")
        assert enrolled.chain[1] == second.cert
        # The retired root stays trusted while leaves it signed may live.
        roots = certs_from_der(list((await ca.bundle()).root_certificates))
        assert old_root.cert in roots


Case = Callable[[ThrowawayCA, ThrowawayCA], admin_pb2.ImportAuthorityRequest]


def _request(ca: ThrowawayCA, chain: bytes = b"") -> admin_pb2.ImportAuthorityRequest:
    return admin_pb2.ImportAuthorityRequest(
        certificate_pem=ca.cert_pem, private_key_pem=ca.key_pem, chain_pem=chain
    )


def _long(root: ThrowawayCA, **kw: object) -> ThrowawayCA:
    return root.intermediate(not_after=time.time() + 90 * DAY, **kw)  # type: ignore[arg-type]


REFUSALS: dict[str, tuple[Case, grpc.StatusCode, str]] = {
    "key of another certificate": (
        lambda root, first: admin_pb2.ImportAuthorityRequest(
            certificate_pem=_long(root).cert_pem, private_key_pem=_long(root).key_pem
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the key does not match the certificate",
    ),
    "not a CA": (
        lambda root, first: _request(_long(root, ca=False)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "is not a CA certificate",
    ),
    "expired": (
        lambda root, first: _request(
            root.intermediate(not_before=time.time() - 9 * DAY, not_after=time.time() - DAY)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expired at",
    ),
    "a foreign root and no chain": (
        lambda root, first: _request(_long(ThrowawayCA.root(common_name="Elsewhere"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the chain does not verify",
    ),
    "too short for the leaf TTL rule": (
        lambda root, first: _request(root.intermediate(not_after=time.time() + 2 * DAY)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least 6x the longest",
    ),
    "expires before the active one": (
        lambda root, first: _request(root.intermediate(not_after=time.time() + 20 * DAY)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "it would never become the signer",
    ),
    "the active one again": (
        lambda root, first: _request(first),
        grpc.StatusCode.ALREADY_EXISTS,
        "is already authority",
    ),
    "not PEM": (
        lambda root, first: admin_pb2.ImportAuthorityRequest(
            certificate_pem=b"hello", private_key_pem=b"world"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the certificate is not in PEM form",
    ),
}


async def test_bad_imports_are_refused_and_change_nothing(tmp_path: Path) -> None:
    root = ThrowawayCA.root(common_name="Corp Root")
    upstream, first = _upstream(tmp_path, root)
    async with running_ca(tmp_path, upstream=upstream) as ca, ca.admin() as stub:
        before = await _journal(ca)
        for name, (make, code, message) in REFUSALS.items():
            error = await rpc_error(stub.ImportAuthority(make(root, first)))
            assert error.code() == code, (name, error.details())
            assert message in (error.details() or ""), (name, error.details())
        assert await _journal(ca) == before
        assert _signer_cert_fp(ca) == fingerprint_sha256(first.cert)


async def test_a_self_managed_ca_refuses_imports(tmp_path: Path) -> None:
    root = ThrowawayCA.root(common_name="Corp Root")
    async with running_ca(tmp_path) as ca, ca.admin() as stub:
        error = await rpc_error(stub.ImportAuthority(_request(_long(root), root.cert_pem)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not in upstream mode" in (error.details() or "")
