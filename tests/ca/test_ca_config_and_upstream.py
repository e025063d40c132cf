"""CA configuration sources and precedence, validation messages, and a CA serving in
upstream mode (the operator's intermediate) end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ca_server.config import CAConfig, HostPort, UpstreamConfig, load
from ca_server.errors import ConfigError
from meshtls.identity.pem import certs_from_der
from tests.ca.helpers import enroll_node
from tests.support.ca import running_ca
from tests.support.pki import ThrowawayCA


def test_flags_win_over_env_which_win_over_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "ca.yaml"
    config_file.write_text(
        "trust_domain: file.example\nnode_ttl: 2h\nlisten: 127.0.0.1:9001\n"
        "upstream:\n  cert_file: a.pem\n  key_file: a.key\n  chain_file: chain.pem\n"
    )
    env = {"MESHTLS_CA_TRUST_DOMAIN": "env.example", "MESHTLS_CA_LISTEN": "127.0.0.1:9002"}
    config = load(file=config_file, environ=env, overrides={"listen": "127.0.0.1:9003"})
    assert config.trust_domain == "env.example"
    assert config.listen == HostPort("127.0.0.1", 9003)
    assert config.node_ttl == 7200
    assert config.upstream == UpstreamConfig(Path("a.pem"), Path("a.key"), Path("chain.pem"))
    assert load(environ={}).trust_domain == CAConfig().trust_domain


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"trust_domain": "Bad_Domain!"}, "trust_domain"),
        ({"listen": "nope"}, "listen: expected HOST:PORT"),
        ({"node_ttl": "soon"}, "node_ttl: expected a duration"),
        ({"node_ttl": "6d"}, "above 1/6 of intermediate_ttl"),
        ({"http_listen": "0.0.0.0:8480"}, "allow_public_listen"),
        ({"admin_spiffe_ids": "spiffe://other.org/admin"}, "not in example.org"),
        ({"colour": "blue"}, "unknown configuration keys: colour"),
        ({"upstream": {"cert_file": "a.pem"}}, "upstream: missing key_file, chain_file"),
    ],
)
def test_bad_configuration_is_refused_with_a_message(
    source: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(environ={}, overrides=source)


def test_unknown_environment_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="MESHTLS_CA_LISTN"):
        load(environ={"MESHTLS_CA_LISTN": "127.0.0.1:1"})


def test_serve_reports_a_bad_config_file_and_exits_2(tmp_path: Path) -> None:
    config_file = tmp_path / "ca.yaml"
    config_file.write_text("trust_domain: [not, a, string\n")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "meshtls-ca"), "serve", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "is not valid YAML" in done.stderr


async def test_upstream_mode_issues_under_the_operators_intermediate(tmp_path: Path) -> None:
    root = ThrowawayCA.root(common_name="Corp Root")
    intermediate = root.intermediate(common_name="Corp meshtls issuing CA")
    cert_file, key_file = intermediate.write(tmp_path / "upstream", "intermediate")
    chain_file = tmp_path / "upstream" / "chain.pem"
    chain_file.write_bytes(root.cert_pem)
    upstream = UpstreamConfig(cert_file, key_file, chain_file)
    async with running_ca(tmp_path, upstream=upstream) as ca:
        assert certs_from_der(list((await ca.bundle()).root_certificates)) == [root.cert]
        enrolled = await enroll_node(ca, "web-1")
        leaf, issuer = enrolled.chain[:2]
        assert issuer == intermediate.cert
        leaf.verify_directly_issued_by(intermediate.cert)
