"""What every peer must trust right now, and who is revoked: the versioned snapshot the
Watch stream pushes, plus the keyring that signs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509

from ca_server.authority.keyring import Keyring
from ca_server.domain import CertificateRecord
from meshtls.identity.pem import certs_to_der, certs_to_pem


@dataclass(frozen=True)
class TrustSnapshot:
    version: int
    roots: tuple[x509.Certificate, ...]
    revoked: tuple[CertificateRecord, ...]

    @property
    def roots_pem(self) -> bytes:
        return certs_to_pem(self.roots)

    @cached_property
    def roots_der(self) -> tuple[bytes, ...]:
        """The roots DER-encoded, once per snapshot (every agent reply carries them)."""
        return tuple(certs_to_der(self.roots))


class TrustState:
    """Holds the active keyring and the current snapshot; wakes watchers on change."""

    def __init__(self, keyring: Keyring, version: int, revoked: list[CertificateRecord]) -> None:
        self._keyring = keyring
        self._snapshot = TrustSnapshot(version, tuple(keyring.roots), tuple(revoked))
        self._changed = asyncio.Event()

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    @property
    def snapshot(self) -> TrustSnapshot:
        return self._snapshot

    def publish(
        self, version: int, revoked: list[CertificateRecord], keyring: Keyring | None = None
    ) -> None:
        """Swap in a new state (and keyring, after a rotation); wake every watcher."""
        if keyring is not None:
            self._keyring = keyring
        roots = tuple(self._keyring.roots)
        if (version, roots, tuple(revoked)) == (
            self._snapshot.version,
            self._snapshot.roots,
            self._snapshot.revoked,
        ):
            return
        self._snapshot = TrustSnapshot(version, roots, tuple(revoked))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_newer(self, version: int) -> TrustSnapshot:
        """Return a snapshot whose version differs from `version`, waiting if needed."""
        while self._snapshot.version == version:
            await self._changed.wait()
        return self._snapshot
