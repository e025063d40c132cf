"""Config validation: every problem names its key, unknown keys are refused, defaults are
documented values, and nothing insecure is accepted silently."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtls.identity.ids import SpiffeId
from sidecar.config import TOKEN_ENV, SidecarConfig, load_config, parse_config
from sidecar.errors import ConfigError
from sidecar.fields import Address, parse_address
from tests.support.pki import ThrowawayCA


@pytest.fixture
def bundle_file(tmp_path: Path) -> Path:
    path = tmp_path / "bundle.pem"
    path.write_bytes(ThrowawayCA.root().cert_pem)
    return path


@pytest.fixture
def base(bundle_file: Path) -> dict[str, Any]:
    return {
        "trust_domain": "example.org",
        "node": "web-1",
        "state_dir": "/var/lib/meshtls",
        "ca": {
            "address": "ca.internal:8443",
            "trust_bundle": str(bundle_file),
            "join_token_file": "/etc/meshtls/token",
        },
        "files": [
            {
                "spiffe_id": "spiffe://example.org/svc/web",
                "dir": "/run/meshtls/web",
                "reload_command": ["systemctl", "reload", "web"],
            }
        ],
        "status": {"listen": "127.0.0.1:15000"},
    }


def parse(doc: Any, env: dict[str, str] | None = None) -> SidecarConfig:
    return parse_config(doc, base_dir=Path("/etc/meshtls"), env=env or {})


def problem(doc: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    return info.value.message


def test_full_config_with_defaults(base: dict[str, Any], bundle_file: Path) -> None:
    config = parse(base)
    assert config.trust_domain == "example.org"
    assert config.node_id == SpiffeId.parse("spiffe://example.org/meshtls/node/web-1")
    assert config.state_dir == Path("/var/lib/meshtls")
    assert config.ca.address == Address("ca.internal", 8443)
    # The enrollment listener defaults to the same host, port + 1.
    assert config.ca.enroll_address == Address("ca.internal", 8444)
    assert len(config.ca.bootstrap_roots) == 1
    assert config.ca.root_fingerprint is None
    assert config.ca.join_token_file == Path("/etc/meshtls/token")
    assert config.ca.timeout_seconds == 10.0
    (sink,) = config.files
    assert sink.spiffe_id == SpiffeId.parse("spiffe://example.org/svc/web")
    assert sink.reload_command == ("systemctl", "reload", "web")
    assert sink.reload_timeout_seconds == 30.0
    assert config.status.listen == Address("127.0.0.1", 15000)
    r = config.renewal
    assert (r.fraction, r.jitter, r.retry_initial_seconds, r.retry_max_seconds) == (
        0.5,
        0.1,
        1.0,
        300.0,
    )


def test_load_config_reads_yaml_and_resolves_relative_paths(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    doc = copy.deepcopy(base)
    doc["state_dir"] = "state"
    doc["files"][0]["dir"] = "out/web"
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = load_config(path, env={})
    assert config.state_dir == tmp_path / "state"
    assert config.files[0].dir == tmp_path / "out" / "web"
    assert config.source == path


def test_token_from_the_environment_is_kept_out_of_repr(base: dict[str, Any]) -> None:
    config = parse(base, env={TOKEN_ENV: " s3cret-token \n"})
    assert config.ca.join_token_env == "s3cret-token"
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("trust_domain",), "Example.org", "trust_domain: trust domain 'Example.org'"),
        (("node",), "web/1", "node: node name 'web/1'"),
        (("ca", "address"), "ca.internal", "ca.address: expected HOST:PORT"),
        (("ca", "address"), "ca.internal:99999", "ca.address: the port"),
        (("ca", "timeout_seconds"), 0, "ca.timeout_seconds: must be at least 0.1"),
        (("ca", "root_fingerprint"), "abc", "set either trust_bundle or root_fingerprint"),
        (("files", 0, "spiffe_id"), "spiffe://example.org/a//b", "files[0].spiffe_id:"),
        (("files", 0, "spiffe_id"), "spiffe://other.org/svc/web", "not in the trust domain"),
        (("files", 0, "reload_command"), "systemctl reload web", "files[0].reload_command:"),
        (("files", 0, "reload_command"), [], "files[0].reload_command:"),
        (("status", "listen"), "0.0.0.0:15000", "status.listen: 0.0.0.0 is not a loopback"),
        (("status", "unsafe_listen"), "yes", "status.unsafe_listen: expected true or false"),
        (("renewal",), {"fraction": 1.5}, "renewal.fraction: must be from 0.05 to 0.95"),
        (("renewal",), {"jitter": 0.5}, "renewal.jitter: must be below both fraction"),
        (
            ("renewal",),
            {"retry_initial_seconds": 10, "retry_max_seconds": 5},
            "renewal.retry_max_seconds: must not be below",
        ),
        (("renewal",), {"fraction": "half"}, "renewal.fraction: expected a number"),
    ],
)
def test_invalid_values_name_the_key(
    base: dict[str, Any], path: tuple[Any, ...], value: Any, expected: str
) -> None:
    doc = copy.deepcopy(base)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert expected in problem(doc)


@pytest.mark.parametrize(
    ("path", "key", "expected"),
    [
        ((), "trustdomain", "trustdomain: unknown key"),
        (("ca",), "adress", "ca.adress: unknown key"),
        (("files", 0), "reload", "files[0].reload: unknown key"),
        (("status",), "port", "status.port: unknown key"),
        (("renewal",), "fractoin", "renewal.fractoin: unknown key"),
    ],
)
def test_unknown_keys_are_rejected(
    base: dict[str, Any], path: tuple[Any, ...], key: str, expected: str
) -> None:
    doc = copy.deepcopy(base)
    doc.setdefault("renewal", {})
    target = doc
    for part in path:
        target = target[part]
    target[key] = 1
    assert expected in problem(doc)


def test_every_problem_is_reported_at_once(base: dict[str, Any]) -> None:
    doc = copy.deepcopy(base)
    del doc["node"]
    doc["ca"]["address"] = "nowhere"
    doc["status"]["listen"] = "10.0.0.1:15000"
    message = problem(doc)
    assert "node: required" in message
    assert "ca.address:" in message
    assert "status.listen:" in message


def test_trust_bundle_or_fingerprint_is_required(base: dict[str, Any]) -> None:
    doc = copy.deepcopy(base)
    del doc["ca"]["trust_bundle"]
    assert "never trusts a CA on first use" in problem(doc)


def test_fingerprint_is_accepted_in_common_spellings(base: dict[str, Any]) -> None:
    doc = copy.deepcopy(base)
    del doc["ca"]["trust_bundle"]
    doc["ca"]["root_fingerprint"] = ":".join(["AB"] * 32)
    config = parse(doc)
    assert config.ca.root_fingerprint == "ab" * 32
    assert config.ca.bootstrap_roots == ()


def test_unreadable_or_empty_bundle_file(base: dict[str, Any], tmp_path: Path) -> None:
    doc = copy.deepcopy(base)
    doc["ca"]["trust_bundle"] = str(tmp_path / "missing.pem")
    assert "ca.trust_bundle: cannot read" in problem(doc)
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    doc["ca"]["trust_bundle"] = str(tmp_path / "empty.pem")
    assert "ca.trust_bundle:" in problem(doc)


def test_unsafe_listen_allows_a_public_status_address(base: dict[str, Any]) -> None:
    doc = copy.deepcopy(base)
    doc["status"] = {"listen": "0.0.0.0:15000", "unsafe_listen": True}
    assert parse(doc).status.listen == Address("0.0.0.0", 15000)
    doc["status"] = {"listen": "[::1]:15000"}
    assert parse(doc).status.listen == Address("::1", 15000)
    doc["status"] = {"listen": "localhost:0"}
    assert parse(doc).status.listen.port == 0


def test_duplicate_file_directories_are_rejected(base: dict[str, Any]) -> None:
    doc = copy.deepcopy(base)
    doc["files"].append(dict(doc["files"][0], spiffe_id="spiffe://example.org/svc/db"))
    assert "files[1].dir: /run/meshtls/web is used by another files entry" in problem(doc)


def test_explicit_enroll_address(base: dict[str, Any]) -> None:
    doc = copy.deepcopy(base)
    doc["ca"]["enroll_address"] = "enroll.internal:9000"
    assert parse(doc).ca.enroll_address == Address("enroll.internal", 9000)


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    assert "must be a YAML mapping" in problem(["a", "list"])
    path = tmp_path / "bad.yaml"
    path.write_text("trust_domain: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ca:8443", Address("ca", 8443)),
        ("[::1]:8443", Address("::1", 8443)),
        ("10.0.0.1:0", Address("10.0.0.1", 0)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize("text", ["ca", ":8443", "ca:http", "::1:8443", "[::1]8443", "ca:-1"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_address(text)
