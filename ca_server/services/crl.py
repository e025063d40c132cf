"""The CRL served to outside verifiers: rebuilt when the revocation list or the signer
changes, and before it reaches half of its validity."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from ca_server.authority.crl import build_crl
from ca_server.services.context import CAContext

CRL_VALIDITY_SECONDS = 3600.0


@dataclass(frozen=True)
class CurrentCrl:
    der: bytes
    number: int
    this_update: float
    next_update: float
    signer_id: str


class CrlCache:
    def __init__(self, validity: float = CRL_VALIDITY_SECONDS) -> None:
        self._validity = validity
        self._current: CurrentCrl | None = None

    def get(self, ctx: CAContext) -> CurrentCrl:
        now = ctx.clock.now()
        snapshot = ctx.trust.snapshot
        signer = ctx.trust.keyring.signer
        current = self._current
        if (
            current is None
            or current.number != snapshot.version
            or current.signer_id != signer.authority_id
            or now >= current.this_update + self._validity / 2
        ):
            crl = build_crl(
                signer,
                list(snapshot.revoked),
                now=now,
                next_update_seconds=self._validity,
                crl_number=snapshot.version,
            )
            current = CurrentCrl(
                der=crl.public_bytes(serialization.Encoding.DER),
                number=snapshot.version,
                this_update=now,
                next_update=now + self._validity,
                signer_id=signer.authority_id,
            )
            self._current = current
        return current
