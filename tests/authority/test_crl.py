"""The CRL for outside verifiers: the real `openssl` binary verifies its signature against
our chain, lists exactly the revoked serials with their reasons, and refuses a revoked leaf
with `-crl_check` while accepting the others; pkilint's CRL linter finds no ERROR."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_server.authority.crl import CRLError, build_crl, crl_der, crl_pem, reason_flag
from ca_server.authority.kek import Kek
from ca_server.authority.keyring import Keyring
from ca_server.authority.material import bootstrap_authorities
from ca_server.authority.signer import Signer
from ca_server.domain import CertificateRecord
from meshtls.identity.ids import SpiffeId
from meshtls.identity.profile import BACKDATE_SECONDS
from meshtls.identity.x509 import fingerprint_sha256, serial_hex
from tests.authority.conftest import INTERMEDIATE_TTL, ROOT_TTL, TRUST_DOMAIN
from tests.authority.test_interop import (
    TOOL_TIMEOUT,
    openssl,
    pem_file,
    pkilint_tool,
    run_pkilint,
    unexpected_errors,
)
from tests.support.pki import make_key

OTHER_ISSUER_ID = "intermediate-of-another-generation"


def record_of(
    leaf: x509.Certificate,
    issuer_id: str,
    *,
    revoked_at: float | None = None,
    reason: str | None = None,
) -> CertificateRecord:
    """The Store's record of `leaf`, as the database layer hands it over."""
    return CertificateRecord(
        serial=serial_hex(leaf),
        spiffe_id=f"spiffe://{TRUST_DOMAIN}/svc/web",
        node_name="web-1",
        kind="workload",
        entry_id=None,
        fingerprint_sha256=fingerprint_sha256(leaf),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        pem=leaf.public_bytes(serialization.Encoding.PEM).decode(),
        issuer_id=issuer_id,
        issued_at=leaf.not_valid_before_utc.timestamp() + BACKDATE_SECONDS,
        revoked_at=revoked_at,
        revocation_reason=reason,
    )


def ca_public_key(signer: Signer) -> ec.EllipticCurvePublicKey:
    key = signer.cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def issue(signer: Signer, now: float, path: str) -> x509.Certificate:
    sid = SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/{path}")
    return signer.issue(make_key().public_key(), sid, ttl_seconds=3600, now=now)


@dataclass(frozen=True)
class Scenario:
    """Four leaves of the active intermediate, two of them revoked, plus a revoked leaf
    of another intermediate that must not appear in this one's CRL."""

    signer: Signer
    compromised: x509.Certificate  # revoked, reason "keyCompromise"
    banned: x509.Certificate  # revoked, free-text reason: no CRLReason extension
    good: list[x509.Certificate]
    foreign: x509.Certificate  # revoked, but issued by another intermediate
    records: list[CertificateRecord]  # every revoked record the Store would return
    crl: x509.CertificateRevocationList


@pytest.fixture
def scenario(signer: Signer, kek: Kek, now: float) -> Scenario:
    compromised = issue(signer, now, "svc/db")
    banned = issue(signer, now, "svc/cache")
    good = [issue(signer, now, "svc/web"), issue(signer, now, "svc/api")]
    other = Keyring.from_authorities(
        bootstrap_authorities(
            TRUST_DOMAIN, root_ttl=ROOT_TTL, intermediate_ttl=INTERMEDIATE_TTL, now=now, kek=kek
        ),
        kek,
    ).signer
    foreign = issue(other, now, "svc/db")
    records = [
        record_of(compromised, signer.authority_id, revoked_at=now - 120, reason="keyCompromise"),
        record_of(banned, signer.authority_id, revoked_at=now - 60, reason="node banned: lost"),
        record_of(foreign, other.authority_id, revoked_at=now - 90, reason="superseded"),
    ]
    crl = build_crl(signer, records, now=now, next_update_seconds=1800, crl_number=7)
    return Scenario(signer, compromised, banned, good, foreign, records, crl)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [openssl(), *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def openssl_crl_entries(crl_file: Path) -> dict[str, str | None]:
    """Serial (lower-case hex) -> CRL reason as `openssl crl -text` prints them (None when
    the entry has no reason code)."""
    result = run("crl", "-in", str(crl_file), "-text", "-noout")
    assert result.returncode == 0, result.stderr
    entries: dict[str, str | None] = {}
    current: str | None = None
    lines = iter(result.stdout.splitlines())
    for line in lines:
        serial = re.fullmatch(r"\s*Serial Number: ([0-9A-F]+)", line)
        if serial:
            current = format(int(serial.group(1), 16), "x")
            entries[current] = None
        elif "CRL Reason Code" in line and current is not None:
            entries[current] = next(lines).strip()
    if not entries:
        assert "No Revoked Certificates." in result.stdout, result.stdout
    return entries


def openssl_verify_with_crl(
    tmp_path: Path, signer: Signer, root: x509.Certificate, crl_file: Path, leaf: x509.Certificate
) -> subprocess.CompletedProcess[str]:
    return run(
        "verify",
        "-x509_strict",
        "-crl_check",  # the CRL of the leaf's issuer only: our root publishes none
        "-CRLfile",
        str(crl_file),
        "-CAfile",
        str(pem_file(tmp_path, "root", [root])),
        "-untrusted",
        str(pem_file(tmp_path, "intermediate", [signer.cert])),
        str(pem_file(tmp_path, f"leaf-{serial_hex(leaf)}", [leaf])),
    )


# --- what outside verifiers see ---------------------------------------------------------


def test_openssl_verifies_the_crl_against_our_chain(
    scenario: Scenario, keyring: Keyring, tmp_path: Path
) -> None:
    crl_file = write(tmp_path / "crl.pem", crl_pem(scenario.crl))
    chain = pem_file(tmp_path, "chain", [scenario.signer.cert, *keyring.roots])
    result = run("crl", "-in", str(crl_file), "-CAfile", str(chain), "-verify", "-noout")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify OK" in result.stdout + result.stderr
    # The DER form is the same CRL.
    der_file = write(tmp_path / "crl.der", crl_der(scenario.crl))
    result = run("crl", "-inform", "DER", "-in", str(der_file), "-CAfile", str(chain), "-verify")
    assert result.returncode == 0, result.stdout + result.stderr


def test_openssl_refuses_the_crl_against_another_chain(
    scenario: Scenario, kek: Kek, now: float, tmp_path: Path
) -> None:
    """The signature check above can fail: same names, different keys."""
    other = bootstrap_authorities(
        TRUST_DOMAIN, root_ttl=ROOT_TTL, intermediate_ttl=INTERMEDIATE_TTL, now=now, kek=kek
    )
    other_chain = [x509.load_pem_x509_certificate(a.cert_pem.encode()) for a in reversed(other)]
    assert other_chain[0].subject == scenario.signer.cert.subject
    crl_file = write(tmp_path / "crl.pem", crl_pem(scenario.crl))
    chain = pem_file(tmp_path, "other-chain", other_chain)
    result = run("crl", "-in", str(crl_file), "-CAfile", str(chain), "-verify", "-noout")
    assert "verify OK" not in result.stdout + result.stderr
    assert "verify failure" in result.stdout + result.stderr


def test_openssl_lists_exactly_the_revoked_serials_with_their_reasons(
    scenario: Scenario, tmp_path: Path
) -> None:
    entries = openssl_crl_entries(write(tmp_path / "crl.pem", crl_pem(scenario.crl)))
    assert entries == {
        serial_hex(scenario.compromised): "Key Compromise",
        serial_hex(scenario.banned): None,
    }


def test_openssl_verify_with_crl_check_refuses_revoked_leaves_only(
    scenario: Scenario, keyring: Keyring, tmp_path: Path
) -> None:
    crl_file = write(tmp_path / "crl.pem", crl_pem(scenario.crl))
    root = keyring.roots[0]
    for revoked in (scenario.compromised, scenario.banned):
        result = openssl_verify_with_crl(tmp_path, scenario.signer, root, crl_file, revoked)
        assert result.returncode != 0, result.stdout
        assert "certificate revoked" in result.stdout + result.stderr
    for leaf in scenario.good:
        result = openssl_verify_with_crl(tmp_path, scenario.signer, root, crl_file, leaf)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith(": OK")


def test_an_empty_crl_is_valid_and_revokes_nothing(
    signer: Signer, keyring: Keyring, now: float, tmp_path: Path
) -> None:
    crl = build_crl(signer, [], now=now, crl_number=1)
    assert len(crl) == 0
    assert crl.is_signature_valid(ca_public_key(signer))
    crl_file = write(tmp_path / "empty.pem", crl_pem(crl))
    chain = pem_file(tmp_path, "chain", [signer.cert, *keyring.roots])
    result = run("crl", "-in", str(crl_file), "-CAfile", str(chain), "-verify", "-noout")
    assert result.returncode == 0, result.stdout + result.stderr
    assert openssl_crl_entries(crl_file) == {}
    leaf = issue(signer, now, "svc/web")
    result = openssl_verify_with_crl(tmp_path, signer, keyring.roots[0], crl_file, leaf)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_pkilint_finds_no_errors_in_our_crls(
    scenario: Scenario, now: float, tmp_path: Path
) -> None:
    tool = pkilint_tool("lint_crl")
    files = {
        "crl": write(tmp_path / "crl.pem", crl_pem(scenario.crl)),
        "empty": write(
            tmp_path / "empty.pem", crl_pem(build_crl(scenario.signer, [], now=now, crl_number=0))
        ),
        # What pkilint flags, so the check above can fail: no CRL number, no AKI.
        "bare": write(
            tmp_path / "bare.pem",
            crl_pem(
                scenario.signer.sign_crl(
                    x509.CertificateRevocationListBuilder()
                    .issuer_name(scenario.signer.cert.subject)
                    .last_update(scenario.crl.last_update_utc)
                    .next_update(scenario.crl.next_update_utc or scenario.crl.last_update_utc)
                )
            ),
        ),
    }
    findings = run_pkilint(
        {name: [tool, "-t", "CRL", "-p", "PKIX", str(path)] for name, path in files.items()}
    )
    errors = unexpected_errors(findings)
    assert [f for f in errors if f.file != "bare"] == []
    assert {f.code for f in errors if f.file == "bare"} >= {
        "pkix.crl_number_missing",
        "pkix.authority_key_identifier_missing",
    }, errors


# --- the CRL's fields --------------------------------------------------------------------


def test_issuer_dates_number_and_authority_key_identifier(scenario: Scenario, now: float) -> None:
    crl, cert = scenario.crl, scenario.signer.cert
    assert crl.issuer == cert.subject
    assert crl.is_signature_valid(ca_public_key(scenario.signer))
    assert crl.last_update_utc.timestamp() == pytest.approx(now - BACKDATE_SECONDS, abs=1)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc.timestamp() == pytest.approx(now + 1800, abs=1)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA256)


def test_next_update_follows_the_given_interval(signer: Signer, now: float) -> None:
    default = build_crl(signer, [], now=now, crl_number=1)
    week = build_crl(signer, [], now=now, next_update_seconds=7 * 86400, crl_number=2)
    assert default.next_update_utc is not None
    assert week.next_update_utc is not None
    assert default.next_update_utc.timestamp() == pytest.approx(now + 3600, abs=1)
    assert week.next_update_utc.timestamp() == pytest.approx(now + 7 * 86400, abs=1)
    assert week.next_update_utc.timestamp() > now


def test_entries_carry_serial_date_and_reason(scenario: Scenario) -> None:
    crl = scenario.crl
    assert len(crl) == 2
    compromised = crl.get_revoked_certificate_by_serial_number(scenario.compromised.serial_number)
    assert compromised is not None
    assert compromised.revocation_date_utc.timestamp() == pytest.approx(
        scenario.records[0].revoked_at, abs=1
    )
    reason = compromised.extensions.get_extension_for_class(x509.CRLReason)
    assert reason.value.reason == x509.ReasonFlags.key_compromise
    assert not reason.critical
    banned = crl.get_revoked_certificate_by_serial_number(scenario.banned.serial_number)
    assert banned is not None
    assert len(banned.extensions) == 0  # unspecified: the extension is left out


def test_records_of_another_issuer_are_left_out(scenario: Scenario, now: float) -> None:
    crl = scenario.crl
    assert crl.get_revoked_certificate_by_serial_number(scenario.foreign.serial_number) is None
    only_foreign = build_crl(scenario.signer, scenario.records[2:], now=now, crl_number=3)
    assert len(only_foreign) == 0


def test_a_serial_listed_twice_appears_once_with_its_earliest_revocation(
    scenario: Scenario, now: float
) -> None:
    first = scenario.records[0]
    again = replace(first, revoked_at=now - 10, revocation_reason="superseded")
    crl = build_crl(scenario.signer, [again, first], now=now, crl_number=8)
    assert len(crl) == 1
    entry = crl.get_revoked_certificate_by_serial_number(scenario.compromised.serial_number)
    assert entry is not None
    assert entry.revocation_date_utc.timestamp() == pytest.approx(first.revoked_at, abs=1)


def test_a_p384_intermediate_signs_its_crl_with_sha384(kek: Kek, now: float) -> None:
    authorities = bootstrap_authorities(
        TRUST_DOMAIN,
        root_ttl=ROOT_TTL,
        intermediate_ttl=INTERMEDIATE_TTL,
        now=now,
        kek=kek,
        key_algorithm="ecdsa-p384",
    )
    signer = Keyring.from_authorities(authorities, kek).signer
    leaf = issue(signer, now, "svc/web")
    record = record_of(leaf, signer.authority_id, revoked_at=now, reason="superseded")
    crl = build_crl(signer, [record], now=now, crl_number=1)
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA384)
    assert crl.is_signature_valid(ca_public_key(signer))
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None


# --- reasons and refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keyCompromise", x509.ReasonFlags.key_compromise),
        ("KEYCOMPROMISE", x509.ReasonFlags.key_compromise),
        ("key compromise", x509.ReasonFlags.key_compromise),
        ("key_compromise: laptop stolen", x509.ReasonFlags.key_compromise),
        ("cACompromise", x509.ReasonFlags.ca_compromise),
        ("affiliation-changed", x509.ReasonFlags.affiliation_changed),
        ("Superseded", x509.ReasonFlags.superseded),
        ("cessationOfOperation", x509.ReasonFlags.cessation_of_operation),
        ("certificateHold", x509.ReasonFlags.certificate_hold),
        ("privilegeWithdrawn", x509.ReasonFlags.privilege_withdrawn),
        ("aACompromise", x509.ReasonFlags.aa_compromise),
        # Unspecified and the delta-CRL-only removeFromCRL get no extension.
        ("unspecified", None),
        ("removeFromCRL", None),
        ("node banned: keyCompromise", None),
        ("the key was compromised", None),
        ("", None),
        (None, None),
    ],
)
def test_reason_text_maps_to_a_standard_reason(
    text: str | None, expected: x509.ReasonFlags | None
) -> None:
    assert reason_flag(text) == expected


def test_a_record_that_is_not_revoked_is_refused(scenario: Scenario, now: float) -> None:
    live = record_of(scenario.good[0], scenario.signer.authority_id)
    with pytest.raises(CRLError, match=r"is not revoked"):
        build_crl(scenario.signer, [*scenario.records, live], now=now, crl_number=1)


@pytest.mark.parametrize("serial", ["", "0", "XYZ", "0A1B", "f" * 41, "8" + "0" * 39])
def test_a_malformed_serial_is_refused(scenario: Scenario, now: float, serial: str) -> None:
    bad = replace(scenario.records[0], serial=serial)
    with pytest.raises(CRLError, match=r"serial"):
        build_crl(scenario.signer, [bad], now=now, crl_number=1)


@pytest.mark.parametrize(
    ("next_update_seconds", "crl_number", "message"),
    [
        (0, 1, r"next_update_seconds must be a positive"),
        (-5, 1, r"next_update_seconds must be a positive"),
        (float("nan"), 1, r"next_update_seconds must be a positive"),
        (3600, -1, r"crl_number must be between"),
        (3600, 1 << 159, r"crl_number must be between"),
    ],
)
def test_bad_arguments_are_refused(
    signer: Signer, now: float, next_update_seconds: float, crl_number: int, message: str
) -> None:
    with pytest.raises(CRLError, match=message):
        build_crl(
            signer, [], now=now, next_update_seconds=next_update_seconds, crl_number=crl_number
        )
