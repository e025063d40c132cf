"""SPIFFE ID, trust domain and node name validation (meshtls.identity.ids)."""

from __future__ import annotations

import pytest

from meshtls.identity.ids import (
    InvalidSpiffeId,
    SpiffeId,
    validate_node_name,
    validate_trust_domain,
)


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://example.org/svc/web",
        "spiffe://example.org/a",
        "spiffe://td-1_x.y/A.b-c_d/e",
        "spiffe://example.org/" + "a" * 2000,
    ],
)
def test_valid_ids_round_trip(text: str) -> None:
    parsed = SpiffeId.parse(text)
    assert str(parsed) == text
    assert SpiffeId.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://example.org/a", "must start with"),
        ("spiffe://example.org", "needs a path"),
        ("spiffe://example.org/", "needs a path"),
        ("spiffe://example.org/a/", "trailing"),
        ("spiffe://example.org//a", "empty path segment"),
        ("spiffe://example.org/a/./b", "'.' or '..'"),
        ("spiffe://example.org/a/../b", "'.' or '..'"),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org/a#f", "fragment"),
        ("spiffe://user@example.org/a", "user info"),
        ("spiffe://example.org:443/a", "port"),
        ("spiffe://Example.org/a", "lower-case"),
        ("spiffe:///a", "empty"),
        ("spiffe://example.org/a b", "path segment"),
        ("spiffe://example.org/a%20b", "path segment"),
        ("spiffe://example.org/" + "a" * 2040, "longer than 2048"),
        # A "$" regex anchor accepts a trailing newline; the parser must not.
        ("spiffe://example.org/a\n", "path segment"),
        ("spiffe://example.org\n/a", "lower-case"),
    ],
)
def test_invalid_ids_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=None) as info:
        SpiffeId.parse(text)
    assert reason in str(info.value)


def test_trust_domain_rules() -> None:
    assert validate_trust_domain("example.org") == "example.org"
    for bad in ["", "UPPER", "a/b", "a:1", "example.org\n", "x" * 256]:
        with pytest.raises(InvalidSpiffeId):
            validate_trust_domain(bad)
    assert validate_trust_domain("x" * 255) == "x" * 255


def test_node_names() -> None:
    assert validate_node_name("web-1") == "web-1"
    assert validate_node_name("a" * 253) == "a" * 253
    for bad in ["", "-web", ".", "..", "a/b", "web-1\n", "a" * 254, "wéb"]:
        with pytest.raises(InvalidSpiffeId):
            validate_node_name(bad)


def test_node_and_ca_identities() -> None:
    node = SpiffeId.for_node("example.org", "web-1")
    assert str(node) == "spiffe://example.org/meshtls/node/web-1"
    assert node.node_name == "web-1"
    assert SpiffeId.parse(str(node)).node_name == "web-1"
    ca = SpiffeId.for_ca("example.org")
    assert str(ca) == "spiffe://example.org/meshtls/ca"
    assert ca.node_name is None
    assert SpiffeId.parse("spiffe://example.org/meshtls/node/a/b").node_name is None
    assert node.member_of("example.org")
    assert not node.member_of("other.org")
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.for_node("example.org", "../x")
