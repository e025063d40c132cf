"""`meshtls-ca authority rotate` (after propagation, or at once with --force) and
`meshtls-ca crl show`, against a running CA, checked with the real openssl."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from cryptography import x509

from ca_server.db.tx import Tx
from ca_server.domain import Authority
from tests.ca.helpers import CLI, enroll_node, run_cli, run_tool, wait_for
from tests.support.ca import RunningCA, running_ca


def _journal(ca: RunningCA) -> list[Authority]:
    assert ca.server is not None
    assert ca.server.ctx is not None

    def load(tx: Tx) -> list[Authority]:
        return tx.list_authorities()

    with ca.server.ctx.store.read() as tx:
        return load(tx)


def _states(ca: RunningCA) -> list[tuple[str, str]]:
    return [(a.kind, a.state) for a in _journal(ca)]


async def test_rotate_force_activates_at_once_and_new_leaves_use_the_new_intermediate(
    tmp_path: Path,
) -> None:
    async with running_ca(tmp_path) as ca:
        before = ca.server.ctx.trust.keyring.signer.authority_id  # type: ignore[union-attr]
        result = await run_cli("authority", "rotate", "--force", "--data-dir", ca.data_dir)
        assert result.returncode == 0, result.stderr
        assert "WARNING: activating at once" in result.stderr
        assert "prepare_intermediate" in result.stdout
        assert "activate" in result.stdout
        assert sorted(_states(ca)) == [
            ("intermediate", "active"),
            ("intermediate", "retired"),
            ("root", "active"),
        ]
        after = ca.server.ctx.trust.keyring.signer.authority_id  # type: ignore[union-attr]
        assert after != before
        node = await enroll_node(ca, "web-1")
        assert node.chain[1] == ca.server.ctx.trust.keyring.signer.cert  # type: ignore[union-attr]
        listing = await run_cli("authority", "list", "--data-dir", ca.data_dir)
        assert "retired" in listing.stdout


async def test_rotate_without_force_activates_after_the_propagation_time(tmp_path: Path) -> None:
    async with running_ca(tmp_path, rotation_min_propagation=1.0) as ca:
        result = await run_cli("authority", "rotate", "--data-dir", ca.data_dir)
        assert result.returncode == 0, result.stderr
        assert "activates at" in result.stdout
        assert ("intermediate", "prepared") in _states(ca)

        async def activated() -> bool:
            return ("intermediate", "prepared") not in _states(ca) and (
                "intermediate",
                "retired",
            ) in _states(ca)

        await wait_for(activated, within=20, what="the requested rotation to activate")


async def test_crl_lists_revocations_and_verifies_with_openssl(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as ca:
        node = await enroll_node(ca, "web-1")
        serial = format(node.cert.serial_number, "x")
        await ca.revoke(serial, reason="keyCompromise")
        shown = await run_cli("crl", "show", "--data-dir", ca.data_dir)
        assert shown.returncode == 0, shown.stderr
        crl_file = tmp_path / "crl.pem"
        crl_file.write_text(shown.stdout)
        chain = tmp_path / "chain.pem"
        assert ca.server is not None
        assert ca.server.ctx is not None
        signer = ca.server.ctx.trust.keyring.signer
        from meshtls.identity.pem import certs_to_pem

        chain.write_bytes(certs_to_pem([*signer.chain, *ca.server.ctx.trust.snapshot.roots]))
        verified = await run_tool(
            "openssl", "crl", "-in", crl_file, "-CAfile", chain, "-verify", "-noout"
        )
        assert verified.returncode == 0, verified.stderr
        assert "verify OK" in verified.stderr + verified.stdout
        text = await run_tool("openssl", "crl", "-in", crl_file, "-noout", "-text")
        assert (
            serial.upper().zfill(len(serial) + len(serial) % 2)
            in text.stdout.replace(":", "").upper()
        )
        assert "Key Compromise" in text.stdout

        def crl_der() -> bytes:
            return subprocess.run(
                [CLI, "crl", "show", "--der", "--data-dir", str(ca.data_dir)],
                capture_output=True,
                timeout=60,
                check=True,
            ).stdout

        der = await asyncio.to_thread(crl_der)
        assert x509.load_der_x509_crl(der).get_revoked_certificate_by_serial_number(
            node.cert.serial_number
        )
