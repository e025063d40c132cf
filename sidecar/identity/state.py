"""What the sidecar keeps in its state directory, so that a restart needs neither the CA
nor a new join token while the stored certificates are still valid.

Layout (directory 0700, every file 0600, each written atomically as one JSON document so
that a key and its certificate can never come from two different renewals):

    node.json              node name, key (PKCS#8 PEM), certificate chain, issue time
    bundle.json            trust domain, version and roots of the last trust bundle
    entries.json           the registration entries last listed by the CA
    identities/<id>.json   one workload identity: its entry, key, chain and issue time

A file that cannot be parsed or fails validation is renamed to `<name>.corrupt`, reported
with the reason, and otherwise ignored: the sidecar enrolls or signs again instead of
crashing. Loaded certificates go through the same checks as fresh ones from the CA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtls.identity.ids import InvalidSpiffeId, SpiffeId
from meshtls.identity.pem import certs_from_pem, certs_to_pem, write_atomic
from meshtls.identity.x509 import CertificateError
from sidecar.errors import StateError
from sidecar.identity.keys import key_from_pem, key_to_pem
from sidecar.identity.model import Entry, NodeIdentity, Svid, TrustBundle, WorkloadIdentity
from sidecar.identity.verify import check_bundle, verify_svid

log = logging.getLogger(__name__)

FORMAT = 1
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class StoredSvid:
    """An SVID as loaded from disk, before the manager schedules it."""

    svid: Svid
    issued_at: float


@dataclass
class LoadedState:
    bundle: TrustBundle | None = None
    node: StoredSvid | None = None
    entries: tuple[Entry, ...] | None = None  # None: never listed
    identities: dict[str, tuple[Entry, StoredSvid]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _file_name(entry_id: str) -> str:
    if _SAFE_NAME_RE.match(entry_id):
        return f"{entry_id}.json"
    return hashlib.sha256(entry_id.encode()).hexdigest()[:40] + ".json"


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "spiffe_id": str(entry.spiffe_id),
        "dns_names": list(entry.dns_names),
        "ttl_seconds": entry.ttl_seconds,
        "selectors": list(entry.selectors),
    }


def _entry_from_json(data: object) -> Entry:
    if not isinstance(data, dict):
        raise ValueError("an entry must be a JSON object")
    entry_id, sid = data.get("id"), data.get("spiffe_id")
    dns, ttl = data.get("dns_names", []), data.get("ttl_seconds", 0)
    if not isinstance(entry_id, str) or not entry_id or not isinstance(sid, str):
        raise ValueError("an entry needs a string id and spiffe_id")
    if not isinstance(dns, list) or not all(isinstance(d, str) for d in dns):
        raise ValueError("dns_names must be a list of strings")
    if not isinstance(ttl, int):
        raise ValueError("ttl_seconds must be an integer")
    selectors = data.get("selectors", [])
    if not isinstance(selectors, list) or not all(isinstance(s, str) for s in selectors):
        raise ValueError("selectors must be a list of strings")
    return Entry(entry_id, SpiffeId.parse(sid), tuple(dns), ttl, tuple(selectors))


def _svid_to_json(svid: Svid, issued_at: float) -> dict[str, Any]:
    return {
        "spiffe_id": str(svid.spiffe_id),
        "key_pem": key_to_pem(svid.key).decode(),
        "chain_pem": certs_to_pem(svid.chain).decode(),
        "issued_at": issued_at,
    }


def _svid_from_json(data: dict[str, Any]) -> StoredSvid:
    sid, key_pem, chain_pem = data.get("spiffe_id"), data.get("key_pem"), data.get("chain_pem")
    issued_at = data.get("issued_at")
    if not isinstance(sid, str) or not isinstance(key_pem, str) or not isinstance(chain_pem, str):
        raise ValueError("spiffe_id, key_pem and chain_pem must be strings")
    if not isinstance(issued_at, int | float):
        raise ValueError("issued_at must be a number")
    chain = tuple(certs_from_pem(chain_pem.encode()))
    return StoredSvid(Svid(SpiffeId.parse(sid), chain, key_from_pem(key_pem.encode())), issued_at)


class StateStore:
    """Reads and writes the state directory. All methods are synchronous and quick; writes
    raise StateError (with the path) when the disk refuses them."""

    def __init__(self, directory: Path, trust_domain: str, node_name: str) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.node_id = SpiffeId.for_node(trust_domain, node_name)
        self.node_name = node_name

    @property
    def identities_dir(self) -> Path:
        return self.directory / "identities"

    def prepare(self) -> None:
        """Create the directories with mode 0700; StateError if that is impossible."""
        for d in (self.directory, self.identities_dir):
            try:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)
            except OSError as exc:
                raise StateError(
                    f"cannot use state directory {d}: {exc.strerror or exc}; check state_dir "
                    "and the permissions of its parent"
                ) from None

    # -- writing -----------------------------------------------------------------------

    def _write(self, path: Path, doc: dict[str, Any]) -> None:
        doc = {"format": FORMAT, **doc}
        try:
            write_atomic(path, json.dumps(doc, indent=1).encode(), mode=0o600)
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot remove {path}: {exc.strerror or exc}") from None

    def save_bundle(self, bundle: TrustBundle) -> None:
        self._write(
            self.directory / "bundle.json",
            {
                "trust_domain": bundle.trust_domain,
                "version": bundle.version,
                "refresh_hint_seconds": bundle.refresh_hint_seconds,
                "roots_pem": bundle.pem().decode(),
            },
        )

    def save_node(self, node: NodeIdentity) -> None:
        self._write(
            self.directory / "node.json",
            {"name": node.name, **_svid_to_json(node.svid, node.issued_at)},
        )

    def clear_node(self) -> None:
        self._unlink(self.directory / "node.json")

    def save_entries(self, entries: tuple[Entry, ...]) -> None:
        self._write(
            self.directory / "entries.json", {"entries": [_entry_to_json(e) for e in entries]}
        )

    def save_identity(self, identity: WorkloadIdentity) -> None:
        self._write(
            self.identities_dir / _file_name(identity.entry.id),
            {
                "entry": _entry_to_json(identity.entry),
                **_svid_to_json(identity.svid, identity.issued_at),
            },
        )

    def remove_identity(self, entry_id: str) -> None:
        self._unlink(self.identities_dir / _file_name(entry_id))

    # -- reading -----------------------------------------------------------------------

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("format") != FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}, expected {FORMAT}")
        return doc

    def _quarantine(self, path: Path, reason: str, state: LoadedState) -> None:
        message = f"ignoring {path}: {reason}"
        state.problems.append(message)
        log.warning(
            "state file ignored; it was renamed to %s.corrupt",
            path.name,
            extra={"path": str(path), "problem": reason},
        )
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".corrupt"))

    def load(self, now: float) -> LoadedState:
        """Everything valid in the state directory. Never raises for bad content.

        The node SVID is returned even when it has expired (the manager reports that);
        expired workload identities are dropped.
        """
        state = LoadedState()
        state.bundle = self._load_bundle(state)
        if state.bundle is None:
            if (self.directory / "node.json").exists():
                state.problems.append("no usable trust bundle in the state; enrolling again")
            return state
        state.node = self._load_node(state, state.bundle, now)
        state.entries = self._load_entries(state)
        self._load_identities(state, state.bundle, now)
        return state

    def _load_bundle(self, state: LoadedState) -> TrustBundle | None:
        path = self.directory / "bundle.json"
        try:
            doc = self._read(path)
            if doc is None:
                return None
            version, hint = doc.get("version"), doc.get("refresh_hint_seconds", 0)
            roots_pem, td = doc.get("roots_pem"), doc.get("trust_domain")
            if not isinstance(version, int) or not isinstance(hint, int):
                raise ValueError("version and refresh_hint_seconds must be integers")
            if not isinstance(roots_pem, str) or not isinstance(td, str):
                raise ValueError("roots_pem and trust_domain must be strings")
            bundle = TrustBundle(td, tuple(certs_from_pem(roots_pem.encode())), version, hint)
            check_bundle(bundle, self.trust_domain)
            return bundle
        except (ValueError, CertificateError, InvalidSpiffeId, OSError) as exc:
            self._quarantine(path, str(exc), state)
            return None

    def _load_node(self, state: LoadedState, bundle: TrustBundle, now: float) -> StoredSvid | None:
        path = self.directory / "node.json"
        try:
            doc = self._read(path)
            if doc is None:
                return None
            if doc.get("name") != self.node_name:
                state.problems.append(
                    f"the stored node certificate is for node {doc.get('name')!r}, the config "
                    f"says {self.node_name!r}; enrolling again"
                )
                return None
            stored = _svid_from_json(doc)
            # Expiry is the manager's to report, so check everything else "just before" it.
            verify_svid(stored.svid, bundle, min(now, stored.svid.not_after - 1), self.node_id)
            return stored
        except (ValueError, CertificateError, InvalidSpiffeId, OSError) as exc:
            self._quarantine(path, str(exc), state)
            return None

    def _load_entries(self, state: LoadedState) -> tuple[Entry, ...] | None:
        path = self.directory / "entries.json"
        try:
            doc = self._read(path)
            if doc is None:
                return None
            items = doc.get("entries")
            if not isinstance(items, list):
                raise ValueError("entries must be a list")
            return tuple(_entry_from_json(e) for e in items)
        except (ValueError, InvalidSpiffeId, OSError) as exc:
            self._quarantine(path, str(exc), state)
            return None

    def _load_identities(self, state: LoadedState, bundle: TrustBundle, now: float) -> None:
        if not self.identities_dir.is_dir():
            return
        try:
            paths = sorted(self.identities_dir.glob("*.json"))
        except OSError as exc:
            state.problems.append(f"cannot list {self.identities_dir}: {exc}")
            return
        for path in paths:
            try:
                doc = self._read(path)
                if doc is None:
                    continue
                entry = _entry_from_json(doc.get("entry"))
                stored = _svid_from_json(doc)
                if stored.svid.expired(now):
                    log.info(
                        "stored identity has expired; it will be signed again",
                        extra={"spiffe_id": str(entry.spiffe_id), "entry_id": entry.id},
                    )
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                    continue
                verify_svid(stored.svid, bundle, now, entry.spiffe_id)
                state.identities[entry.id] = (entry, stored)
            except (ValueError, CertificateError, InvalidSpiffeId, OSError) as exc:
                self._quarantine(path, str(exc), state)
