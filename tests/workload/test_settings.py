"""The `workload_api:` and `sds:` blocks of the sidecar config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import parse_config
from sidecar.errors import ConfigError
from tests.sidecar.helpers import sidecar_document


def document(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    doc = sidecar_document(
        tmp_path,
        agent_address="127.0.0.1:8443",
        enroll_address="127.0.0.1:8444",
        bundle_path=None,
        root_fingerprint="ab" * 32,
    )
    doc.update(extra)
    return doc


def parse(tmp_path: Path, **extra: Any) -> Any:
    return parse_config(document(tmp_path, **extra), base_dir=tmp_path, env={})


def test_the_blocks_are_optional(tmp_path: Path) -> None:
    config = parse(tmp_path)
    assert config.workload_api is None
    assert config.sds is None


def test_sockets_and_the_opt_in_are_read(tmp_path: Path) -> None:
    config = parse(
        tmp_path,
        workload_api={"socket": "run/workload.sock", "allow_entries_without_selectors": True},
        sds={"socket": "/run/meshtls/sds.sock"},
    )
    assert config.workload_api.socket == tmp_path / "run" / "workload.sock"
    assert config.workload_api.allow_entries_without_selectors is True
    assert config.sds.socket == Path("/run/meshtls/sds.sock")
    assert config.sds.allow_entries_without_selectors is False


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"workload_api": {}}, "workload_api.socket: required"),
        ({"workload_api": "/run/x.sock"}, "workload_api: expected a mapping"),
        ({"sds": {"socket": "/s", "mode": 1}}, "sds.mode: unknown key"),
        (
            {"sds": {"socket": "/s", "allow_entries_without_selectors": "yes"}},
            "sds.allow_entries_without_selectors: expected true or false",
        ),
        ({"sds": {"socket": "/run/" + "x" * 110}}, "a Unix socket path must be at most 107"),
        (
            {"sds": {"socket": "/run/one.sock"}, "workload_api": {"socket": "/run/one.sock"}},
            "is already the socket of",
        ),
    ],
)
def test_problems_are_reported(tmp_path: Path, extra: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(tmp_path, **extra)
    assert problem in str(error.value)


def test_a_file_in_the_way_of_the_socket_is_reported(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        parse(tmp_path, workload_api={"socket": str(tmp_path / "taken")})
