"""The `inbound:` and `outbound:` sections of the sidecar config: the issue's example
parses with its defaults; every unsafe or broken setting is reported with its key, all
at once, through the sidecar's own config loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshtls.identity.ids import SpiffeId
from sidecar.config import SidecarConfig, parse_config
from sidecar.errors import ConfigError
from sidecar.fields import Address
from sidecar.proxy.config import Limits, UnixAddress
from tests.support.pki import ThrowawayCA


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ThrowawayCA.root().cert_pem)
    return {
        "trust_domain": "example.org",
        "node": "web-1",
        "state_dir": str(tmp_path / "state"),
        "ca": {"address": "ca.internal:8443", "trust_bundle": str(bundle)},
        "inbound": [
            {
                "name": "web",
                "listen": "0.0.0.0:15443",
                "forward": "127.0.0.1:8080",
                "identity": "spiffe://example.org/svc/web",
                "allow": ["spiffe://example.org/svc/api"],
                "proxy_protocol": False,
            }
        ],
        "outbound": [
            {
                "name": "db",
                "listen": "127.0.0.1:15001",
                "connect": "db.internal:15443",
                "identity": "spiffe://example.org/svc/web",
                "expect": "spiffe://example.org/svc/db",
            }
        ],
    }


def parse(doc: dict[str, Any]) -> SidecarConfig:
    return parse_config(doc, base_dir=Path("/etc/meshtls"), env={})


def problems(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    return info.value.message


def test_the_issue_example_parses_with_defaults(base: dict[str, Any]) -> None:
    config = parse(base)
    (web,) = config.inbound
    assert web.listen == Address("0.0.0.0", 15443)
    assert web.forward == Address("127.0.0.1", 8080)
    assert web.identity == SpiffeId.parse("spiffe://example.org/svc/web")
    assert web.allow.allows(SpiffeId.parse("spiffe://example.org/svc/api"))
    assert not web.allow.allows(SpiffeId.parse("spiffe://example.org/svc/other"))
    assert (web.audit, web.proxy_protocol, web.min_tls_version) == (False, False, "1.3")
    assert web.limits == Limits()
    (db,) = config.outbound
    assert db.connect == Address("db.internal", 15443)
    assert db.expect.allows(SpiffeId.parse("spiffe://example.org/svc/db"))
    assert db.pool_size == 0


def test_a_config_without_listeners_has_none(base: dict[str, Any]) -> None:
    del base["inbound"], base["outbound"]
    config = parse(base)
    assert config.inbound == ()
    assert config.outbound == ()


def test_unix_forward_and_trust_domain_allow(base: dict[str, Any]) -> None:
    base["inbound"][0]["forward"] = "unix:run/app.sock"
    base["inbound"][0]["allow"] = ["spiffe://example.org", "spiffe://partner.example"]
    (web,) = parse(base).inbound
    assert web.forward == UnixAddress(Path("/etc/meshtls/run/app.sock"))
    assert web.allow.allows(SpiffeId.parse("spiffe://partner.example/any/thing"))


def test_unsafe_settings_need_their_explicit_flag(base: dict[str, Any]) -> None:
    base["inbound"][0]["forward"] = "10.0.0.5:8080"
    base["outbound"][0]["listen"] = "0.0.0.0:15001"
    message = problems(base)
    assert "inbound[0].forward: 10.0.0.5 is not a loopback address" in message
    assert "unsafe_forward: true" in message
    assert "outbound[0].listen: 0.0.0.0 is not a loopback address" in message
    base["inbound"][0]["unsafe_forward"] = True
    base["outbound"][0]["unsafe_listen"] = True
    config = parse(base)
    assert config.inbound[0].unsafe_forward
    assert config.outbound[0].unsafe_listen


def test_every_problem_is_reported_at_once(base: dict[str, Any]) -> None:
    web = base["inbound"][0]
    web.update(
        name="Web Server",
        allow=[],
        identity="spiffe://other.org/svc/web",
        min_tls_version="1.1",
        max_connections=0,
        idle_timeout_seconds=-1,
        colour="blue",
    )
    base["outbound"][0].update(expect="not-a-spiffe-id", connect="db.internal:0", pool_size=500)
    message = problems(base)
    for expected in (
        "inbound[0].name: required, a short name",
        "inbound[0].allow: required, a list of SPIFFE IDs or whole trust domains",
        "inbound[0].identity: spiffe://other.org/svc/web is not in this sidecar's trust domain",
        'inbound[0].min_tls_version: expected "1.2" or "1.3"',
        "inbound[0].max_connections: expected a whole number from 1",
        "inbound[0].idle_timeout_seconds: expected a number of at least",
        "inbound[0].colour: unknown key",
        "outbound[0].expect: 'not-a-spiffe-id' is not a SPIFFE ID",
        "outbound[0].connect: port 0 is not a port to connect to",
        "outbound[0].pool_size: expected a whole number from 0 to 64",
    ):
        assert expected in message, (expected, message)


def test_an_empty_allow_list_is_accepted_in_audit_mode_only(base: dict[str, Any]) -> None:
    base["inbound"][0].update(allow=[], audit=True)
    assert parse(base).inbound[0].allow.empty


def test_names_and_addresses_are_unique(base: dict[str, Any]) -> None:
    base["outbound"][0].update(name="web", listen="0.0.0.0:15443", unsafe_listen=True)
    message = problems(base)
    assert "outbound[0].name: 'web' is already the name of another listener" in message
    assert "outbound[0].listen: 0.0.0.0:15443 is already the address of another listener" in (
        message
    )
