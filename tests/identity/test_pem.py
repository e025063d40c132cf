"""PEM/DER conversions and atomic writes (meshtls.identity.pem)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshtls.identity.pem import (
    certs_from_der,
    certs_from_pem,
    certs_to_der,
    certs_to_pem,
    write_atomic,
)
from tests.support.pki import ThrowawayCA


def test_chain_round_trips_through_pem_and_der() -> None:
    leaf = ThrowawayCA.root().intermediate().leaf()
    chain = leaf.chain
    assert certs_from_pem(certs_to_pem(chain)) == chain
    assert certs_from_der(certs_to_der(chain)) == chain


def test_certs_from_pem_refuses_input_without_certificates() -> None:
    with pytest.raises(ValueError, match="PEM"):
        certs_from_pem(b"no certificate here")


def test_write_atomic_sets_mode_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "svid_key.pem"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(target, b"second", mode=0o644)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(os.listdir(target.parent)) == ["svid_key.pem"]


def test_write_atomic_failure_keeps_old_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "bundle.pem"
    write_atomic(target, b"old")

    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["bundle.pem"]
