"""The certificates the CA issues, judged by outside tools: `openssl verify` against the
bundle printed by the real `meshtls-ca bundle show`, and the pkilint RFC 5280 linter; and
each one's row and audit event in the database."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.domain import CertificateKind
from meshtls.identity.pem import certs_from_pem, certs_to_pem
from meshtls.identity.profile import profile_problems
from meshtls.identity.x509 import fingerprint_sha256, serial_hex, spiffe_id_of
from meshtls.v1 import agent_pb2_grpc
from tests.ca.helpers import (
    audit_for,
    certificate,
    der_chain,
    enroll_node,
    key_and_csr,
    node_channel,
    run_cli,
    run_tool,
    sign_one,
)
from tests.support.ca import RunningCA, running_ca

pytestmark = pytest.mark.asyncio(loop_scope="module")

PKILINT = Path(sys.executable).parent / "lint_pkix_cert"
# spiffe:// URIs are not in pkilint's list of schemes it can parse; that one finding is
# expected on every X509-SVID.
ALLOWED_FINDINGS = {"pkix.invalid_uri_syntax"}
# `openssl verify -purpose` for what each kind of certificate is used for.
PURPOSE: dict[CertificateKind, str] = {
    "workload": "sslserver",
    "node": "sslclient",
    "ca-server": "sslserver",
}


@dataclass
class Issued:
    ca: RunningCA
    workdir: Path
    intermediate: Path
    intermediate_cert: x509.Certificate
    certs: dict[CertificateKind, x509.Certificate]


async def served_certificate(address: str, roots_pem: bytes) -> x509.Certificate:
    """The certificate the CA presents on `address` in a real TLS handshake."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cadata=roots_pem.decode())
    context.check_hostname = False
    _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def issued(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Issued]:
    workdir = tmp_path_factory.mktemp("issued")
    async with running_ca(workdir) as ca:
        node = await enroll_node(ca, "lint-1")
        entry = await ca.create_entry(
            f"spiffe://{ca.trust_domain}/svc/lint", "lint-1", dns_names=["lint.internal"]
        )
        async with node_channel(ca, node) as channel:
            signed = await sign_one(
                agent_pb2_grpc.AgentServiceStub(channel), entry, key_and_csr()[1]
            )
        chain = der_chain(signed.identities[0].certificate.certificates)
        server_cert = await served_certificate(ca.enroll_address, ca.bundle_pem)
        intermediate = workdir / "intermediate.pem"
        intermediate.write_bytes(certs_to_pem(chain[1:]))
        yield Issued(
            ca,
            workdir,
            intermediate,
            chain[1],
            {"workload": chain[0], "node": node.cert, "ca-server": server_cert},
        )


@dataclass
class Bundle:
    path: Path
    pem: bytes


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bundle(issued: Issued) -> Bundle:
    """The trust bundle as the operator gets it: stdout of `meshtls-ca bundle show`."""
    shown = await run_cli("bundle", "show", "--data-dir", issued.ca.data_dir)
    assert shown.returncode == 0, shown.stderr
    path = issued.workdir / "bundle.pem"
    path.write_text(shown.stdout)
    return Bundle(path, shown.stdout.encode())


async def test_bundle_show_prints_exactly_the_roots(issued: Issued, bundle: Bundle) -> None:
    roots = certs_from_pem(bundle.pem)
    assert roots
    assert certs_to_pem(roots) == issued.ca.bundle_pem
    for root in roots:
        assert root.issuer == root.subject


@pytest.mark.parametrize("kind", list(PURPOSE))
async def test_openssl_verifies_the_chain(
    issued: Issued, bundle: Bundle, kind: CertificateKind
) -> None:
    leaf = issued.workdir / f"{kind}.pem"
    leaf.write_bytes(issued.certs[kind].public_bytes(serialization.Encoding.PEM))
    result = await run_tool(
        "openssl", "verify", "-x509_strict", "-purpose", PURPOSE[kind],
        "-CAfile", bundle.path, "-untrusted", issued.intermediate, leaf,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{leaf}: OK"


@pytest.mark.parametrize("kind", list(PURPOSE))
async def test_pkilint_finds_no_error(issued: Issued, kind: CertificateKind) -> None:
    der_file = issued.workdir / f"{kind}.der"
    der_file.write_bytes(issued.certs[kind].public_bytes(serialization.Encoding.DER))
    result = await run_tool(
        PKILINT, "lint", "-s", "ERROR", "-f", "JSON", "--document-format", "DER", der_file
    )
    assert result.stdout.strip(), f"pkilint printed nothing: {result.stderr}"
    findings = [
        (finding["code"], finding["severity"], finding.get("message"), entry["node_path"])
        for entry in json.loads(result.stdout)["results"]
        for finding in entry["finding_descriptions"]
    ]
    assert all(f[1] in {"ERROR", "FATAL"} for f in findings), "-s ERROR filters the rest"
    unexpected = [f for f in findings if f[0] not in ALLOWED_FINDINGS]
    assert unexpected == [], f"pkilint: ERROR or worse on the {kind} certificate"


@pytest.mark.parametrize("kind", list(PURPOSE))
async def test_each_certificate_has_its_row_and_audit_event(
    issued: Issued, kind: CertificateKind
) -> None:
    ca, cert = issued.ca, issued.certs[kind]
    serial = serial_hex(cert)
    record = certificate(ca, serial)
    assert record is not None, f"no row for the {kind} certificate {serial}"
    assert ca.server is not None
    assert ca.server.ctx is not None
    assert record.kind == kind
    assert record.spiffe_id == str(spiffe_id_of(cert))
    assert record.node_name == {"workload": "lint-1", "node": "lint-1", "ca-server": ""}[kind]
    assert record.fingerprint_sha256 == fingerprint_sha256(cert)
    assert record.not_before == cert.not_valid_before_utc.timestamp()
    assert record.not_after == cert.not_valid_after_utc.timestamp()
    assert record.pem == cert.public_bytes(serialization.Encoding.PEM).decode()
    assert record.status(ca.server.ctx.clock.now()) == "valid"
    assert record.revoked_at is None
    assert record.issuer_id == ca.server.ctx.trust.keyring.active_intermediate.id
    if kind == "workload":
        assert record.entry_id, "a workload certificate names the entry it was signed for"

    events = [e for e in audit_for(ca, serial) if e.action == "certificate.issue"]
    assert len(events) == 1
    assert events[0].details.get("kind") == kind
    assert events[0].details.get("spiffe_id") == record.spiffe_id


@pytest.mark.parametrize("kind", list(PURPOSE))
async def test_each_certificate_meets_the_x509_svid_profile(
    issued: Issued, kind: CertificateKind
) -> None:
    assert profile_problems(issued.certs[kind], issued.intermediate_cert) == []
