"""Small builders of domain objects for the database tests (plausible values, each field
overridable)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import Any

from ca_server.domain import AuditEvent, Authority, CertificateRecord, Entry, JoinToken, Node

TD = "spiffe://example.org"
T0 = 1_700_000_000.0


def token_hash() -> str:
    return hashlib.sha256(secrets.token_bytes(32)).hexdigest()


def join_token(**overrides: Any) -> JoinToken:
    values: dict[str, Any] = {
        "token_hash": token_hash(),
        "node_name": "web-1",
        "created_at": T0,
        "expires_at": T0 + 600,
    }
    values.update(overrides)
    return JoinToken(**values)


def node(name: str = "web-1", **overrides: Any) -> Node:
    values: dict[str, Any] = {
        "name": name,
        "spiffe_id": f"{TD}/meshtls/node/{name}",
        "status": "active",
        "current_serial": None,
        "enrolled_at": T0,
        "last_seen_at": None,
        "certificate_expires_at": None,
    }
    values.update(overrides)
    return Node(**values)


def entry(spiffe_path: str = "svc/api", node_name: str = "web-1", **overrides: Any) -> Entry:
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "spiffe_id": f"{TD}/{spiffe_path}",
        "node_name": node_name,
        "dns_names": ("api.internal",),
        "ttl_seconds": 3600,
        "selectors": ("unix:uid:1000",),
        "created_at": T0,
    }
    values.update(overrides)
    return Entry(**values)


def certificate(serial: str | None = None, **overrides: Any) -> CertificateRecord:
    values: dict[str, Any] = {
        "serial": serial or secrets.token_hex(20),
        "spiffe_id": f"{TD}/svc/api",
        "node_name": "web-1",
        "kind": "workload",
        "entry_id": None,
        "fingerprint_sha256": secrets.token_hex(32),
        "not_before": T0 - 10,
        "not_after": T0 + 3600,
        "pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "issuer_id": "int-1",
        "issued_at": T0,
    }
    values.update(overrides)
    return CertificateRecord(**values)


def authority(authority_id: str = "root-1", **overrides: Any) -> Authority:
    values: dict[str, Any] = {
        "id": authority_id,
        "kind": "root",
        "state": "active",
        "parent_id": None,
        "cert_pem": "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n",
        "encrypted_key": b"mkek1" + secrets.token_bytes(60),
        "upstream": False,
        "fingerprint_sha256": secrets.token_hex(32),
        "subject": "CN=meshtls root CA,O=example.org",
        "not_before": T0,
        "not_after": T0 + 86400 * 365,
        "created_at": T0,
    }
    values.update(overrides)
    return Authority(**values)


def audit_event(**overrides: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "at": T0,
        "actor": "admin:unix",
        "action": "entry.create",
        "subject": "entry-1",
        "details": {"spiffe_id": f"{TD}/svc/api", "dns_names": ["api.internal"]},
    }
    values.update(overrides)
    return AuditEvent(**values)
