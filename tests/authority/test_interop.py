"""What outside tools say about our certificates: the real `openssl verify` binary accepts
every chain we build, and pkilint (RFC 5280 linter) finds no ERROR in the root, the
intermediate or a leaf, other than `pkix.invalid_uri_syntax` on the spiffe:// URI
(pkilint does not know the spiffe scheme)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek
from ca_server.authority.keyring import Keyring
from ca_server.authority.upstream import load_upstream
from meshtls.identity.ids import SpiffeId
from tests.support.pki import KeyKind, ThrowawayCA, make_key

SID = SpiffeId.parse("spiffe://example.org/svc/web")
ALLOWED_ERRORS = {"pkix.invalid_uri_syntax"}
BAD_SEVERITIES = {"ERROR", "FATAL"}
TOOL_TIMEOUT = 60


def pem_file(directory: Path, name: str, certs: Sequence[x509.Certificate]) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("the openssl binary is missing; install it (scripts/system-deps.sh)")
    return path


def openssl_verify(
    root: Path, untrusted: Path, leaf: Path, purpose: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            openssl(),
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            str(root),
            "-untrusted",
            str(untrusted),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )


def assert_openssl_accepts(root: Path, untrusted: Path, leaf: Path) -> None:
    for purpose in ("sslserver", "sslclient"):
        result = openssl_verify(root, untrusted, leaf, purpose)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == f"{leaf}: OK"


@dataclass(frozen=True)
class Finding:
    file: str
    node_path: str
    code: str
    severity: str
    message: str | None


def pkilint_tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is missing: install the dev dependencies (pip install -e '.[dev]')")
    return str(path)


def run_pkilint(commands: dict[str, list[str]]) -> list[Finding]:
    """Run the linters concurrently (each start costs ~0.5 s); every finding they report."""
    procs = {
        label: subprocess.Popen(
            [*cmd[:1], "lint", "-f", "JSON", "-s", "ALL", *cmd[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label, cmd in commands.items()
    }
    findings: list[Finding] = []
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=TOOL_TIMEOUT)
        try:
            report = json.loads(out)
        except json.JSONDecodeError:
            pytest.fail(f"pkilint did not produce JSON for {label} (exit {proc.returncode}): {err}")
        assert report["results"], f"pkilint validated nothing in {label}"
        for result in report["results"]:
            for finding in result["finding_descriptions"]:
                findings.append(
                    Finding(
                        label,
                        result["node_path"],
                        finding["code"],
                        finding["severity"],
                        finding["message"],
                    )
                )
    return findings


def unexpected_errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in BAD_SEVERITIES and f.code not in ALLOWED_ERRORS]


@pytest.fixture
def own_pki(keyring: Keyring, tmp_path: Path, now: float) -> dict[str, Path]:
    signer = keyring.signer
    files = {
        "root": pem_file(tmp_path, "root", keyring.roots),
        "intermediate": pem_file(tmp_path, "intermediate", [signer.cert]),
    }
    kinds: list[KeyKind] = ["p256", "p384", "ed25519", "rsa2048"]
    for kind in kinds:
        leaf = signer.issue(
            make_key(kind).public_key(),
            SID,
            ttl_seconds=3600,
            now=now,
            # pkilint calls single-label names such as "localhost" invalid syntax, so
            # only qualified names here (the CA allows single labels).
            dns_names=["web.example.org", "web.svc.cluster.local"],
            ip_addresses=["127.0.0.1", "::1"],
        )
        files[f"leaf-{kind}"] = pem_file(tmp_path, f"leaf-{kind}", [leaf])
    return files


def test_openssl_verifies_every_leaf(own_pki: dict[str, Path]) -> None:
    for name, path in own_pki.items():
        if name.startswith("leaf-"):
            assert_openssl_accepts(own_pki["root"], own_pki["intermediate"], path)


def test_openssl_rejects_a_leaf_of_another_ca(own_pki: dict[str, Path], tmp_path: Path) -> None:
    """The verification above can fail: a foreign CA's leaf does not pass."""
    foreign = ThrowawayCA.root(common_name="meshtls root CA").intermediate(
        common_name="meshtls intermediate CA", organization="example.org"
    )
    leaf = pem_file(tmp_path, "foreign-leaf", [foreign.leaf(str(SID)).cert])
    result = openssl_verify(own_pki["root"], own_pki["intermediate"], leaf, "sslclient")
    assert result.returncode != 0
    assert "error" in (result.stdout + result.stderr).lower()


@pytest.mark.slow
def test_pkilint_finds_no_errors(own_pki: dict[str, Path]) -> None:
    tool = pkilint_tool("lint_pkix_cert")
    chain_tool = pkilint_tool("lint_pkix_signer_signee_cert_chain")
    # Every linter start costs about a CPU-second: lint each distinct profile once (the
    # P-384 leaf differs from the P-256 one only in its key).
    linted = ["root", "intermediate", "leaf-p256", "leaf-ed25519", "leaf-rsa2048"]
    commands = {name: [tool, str(own_pki[name])] for name in linted}
    commands["chain intermediate>leaf"] = [
        chain_tool,
        str(own_pki["intermediate"]),
        str(own_pki["leaf-p256"]),
    ]
    findings = run_pkilint(commands)
    assert unexpected_errors(findings) == []
    # The one tolerated error is really the spiffe:// URI, once per certificate.
    tolerated = [f for f in findings if f.code in ALLOWED_ERRORS]
    assert {f.file for f in tolerated} == set(linted)
    assert all("spiffe://example.org" in (f.message or "") for f in tolerated)


def test_pkilint_check_can_fail(tmp_path: Path) -> None:
    """A leaf with a malformed DNS name produces an ERROR the check above would catch."""
    bad = ThrowawayCA.root().intermediate().leaf(str(SID), dns_names=["bad_name..example"])
    path = pem_file(tmp_path, "bad", [bad.cert])
    errors = unexpected_errors(run_pkilint({"bad": [pkilint_tool("lint_pkix_cert"), str(path)]}))
    assert errors, "pkilint should flag a malformed dNSName"


def test_upstream_chain_verifies_with_openssl(tmp_path: Path, kek: Kek) -> None:
    now = time.time()
    root = ThrowawayCA.root(common_name="Corp Root", path_length=None)
    middle = root.intermediate(common_name="Corp Policy CA", path_length=1)
    inter = middle.intermediate(common_name="Corp meshtls CA")
    cert_file, key_file = inter.write(tmp_path, "upstream")
    chain_file = tmp_path / "chain.pem"
    chain_file.write_bytes(middle.cert_pem + root.cert_pem)
    keyring = Keyring.from_authorities(
        load_upstream(cert_file, key_file, chain_file, kek, now), kek
    )
    leaf = keyring.signer.issue(make_key().public_key(), SID, ttl_seconds=600, now=now)
    assert_openssl_accepts(
        pem_file(tmp_path, "bundle", keyring.roots),
        pem_file(tmp_path, "untrusted", keyring.signer.chain),
        pem_file(tmp_path, "leaf", [leaf]),
    )
