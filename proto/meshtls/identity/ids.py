"""SPIFFE IDs and trust domains, validated as the SPIFFE standard spells them.

A SPIFFE ID is `spiffe://<trust-domain>/<path>`: the trust domain is lower-case letters,
digits, `.`, `-` and `_` (at most 255 bytes); the path is non-empty segments of letters,
digits, `.`, `-` and `_`, with no `.` or `..` segment and no trailing `/`; no query,
fragment, port or user info; at most 2048 bytes in all.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

# Used with fullmatch(): a "$" anchor would also accept a trailing newline.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")

NODE_PATH_PREFIX = "meshtls/node/"
CA_PATH = "meshtls/ca"


class InvalidSpiffeId(ValueError):
    """The text is not a valid SPIFFE ID, trust domain or node name; the message says why."""


def validate_trust_domain(text: str) -> str:
    """Return `text` if it is a valid trust domain name, else raise InvalidSpiffeId."""
    if not text:
        raise InvalidSpiffeId("trust domain is empty")
    if len(text.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN_RE.fullmatch(text):
        raise InvalidSpiffeId(
            f"trust domain {text!r} may hold only lower-case letters, digits, '.', '-' and '_'"
        )
    return text


def validate_node_name(text: str) -> str:
    """A node name becomes one path segment of the node's SPIFFE ID."""
    if not _NODE_NAME_RE.fullmatch(text) or text in {".", ".."}:
        raise InvalidSpiffeId(
            f"node name {text!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '-' and '_' (at most 253 characters)"
        )
    return text


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A parsed, valid SPIFFE ID. `str()` gives the canonical URI."""

    trust_domain: str
    path: str  # without the leading "/", never empty

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """InvalidSpiffeId unless `text` is a valid SPIFFE ID. Answers are cached: every
        issuance parses its entry's ID and checks it again in the signed certificate."""
        return _parse(text)

    @classmethod
    def for_node(cls, trust_domain: str, node_name: str) -> SpiffeId:
        validate_trust_domain(trust_domain)
        return cls(trust_domain, NODE_PATH_PREFIX + validate_node_name(node_name))

    @classmethod
    def for_ca(cls, trust_domain: str) -> SpiffeId:
        return cls(validate_trust_domain(trust_domain), CA_PATH)

    @property
    def node_name(self) -> str | None:
        """The node name when this is a meshtls node identity, else None."""
        if self.path.startswith(NODE_PATH_PREFIX):
            name = self.path[len(NODE_PATH_PREFIX) :]
            if "/" not in name:
                return name
        return None

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/{self.path}"


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> SpiffeId:
    if len(text.encode()) > MAX_ID_BYTES:
        raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
    if not text.startswith(SCHEME):
        raise InvalidSpiffeId(f"{text!r} is not a SPIFFE ID: it must start with {SCHEME!r}")
    rest = text[len(SCHEME) :]
    for bad, what in (("?", "a query"), ("#", "a fragment"), ("@", "user info")):
        if bad in rest:
            raise InvalidSpiffeId(f"SPIFFE ID {text!r} must not contain {what}")
    trust_domain, slash, path = rest.partition("/")
    if ":" in trust_domain:
        raise InvalidSpiffeId(f"SPIFFE ID {text!r} must not contain a port")
    validate_trust_domain(trust_domain)
    if not slash or not path:
        raise InvalidSpiffeId(f"SPIFFE ID {text!r} needs a path after the trust domain")
    for segment in path.split("/"):
        if segment == "":
            raise InvalidSpiffeId(f"SPIFFE ID {text!r} has an empty path segment or a trailing '/'")
        if segment in {".", ".."}:
            raise InvalidSpiffeId(f"SPIFFE ID {text!r} must not have '.' or '..' segments")
        if not _SEGMENT_RE.fullmatch(segment):
            raise InvalidSpiffeId(
                f"SPIFFE ID {text!r}: path segment {segment!r} may hold only letters, "
                "digits, '.', '-' and '_'"
            )
    return SpiffeId(trust_domain, path)
