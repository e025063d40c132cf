"""The authorities the running CA uses: the signer of the active intermediate and the
trust bundle (every root that is not retired).

A Keyring is immutable: after a rotation the CA builds a new one from the Store's records
and swaps it in, so a failed build leaves the old one serving.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek, KekError
from ca_server.authority.signer import Signer, load_authority_cert
from ca_server.domain import Authority
from ca_server.errors import ConfigError
from meshtls.identity.pem import certs_from_pem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keyring:
    signer: Signer
    roots: tuple[x509.Certificate, ...]
    authorities: tuple[Authority, ...]
    active_intermediate: Authority

    @classmethod
    def from_authorities(
        cls,
        authorities: Sequence[Authority],
        kek: Kek,
        *,
        bundle_root_ids: Collection[str] | None = None,
    ) -> Keyring:
        """Build the keyring; ConfigError when there is no usable active intermediate
        (none, several, no key, a key the KEK does not open, a broken chain).

        `bundle_root_ids`: the roots of the trust bundle (see
        `ca_server.authority.rotation.bundle_root_ids`); default: every root not retired."""
        active = [a for a in authorities if a.kind == "intermediate" and a.state == "active"]
        if not active:
            raise ConfigError(
                "no active intermediate CA in the database: the CA cannot sign; "
                "initialise it (bootstrap or load an upstream intermediate)"
            )
        if len(active) > 1:
            raise ConfigError(
                "more than one active intermediate CA in the database ("
                + ", ".join(a.id for a in active)
                + "); retire all but one"
            )
        intermediate = active[0]
        by_id = {a.id: a for a in authorities}
        parent_chain = _parent_chain(intermediate, by_id)
        if intermediate.encrypted_key is None:
            raise ConfigError(f"the active intermediate {intermediate.id} has no stored key")
        try:
            signer = Signer.from_authority(intermediate, kek, parent_chain)
        except KekError as exc:
            raise ConfigError(
                f"{exc.args[0]}; start the CA with the KEK it was initialised with "
                f"(the KEK given has id {kek.id})"
            ) from None
        roots = tuple(
            load_authority_cert(a)
            for a in authorities
            if a.kind == "root"
            and (a.id in bundle_root_ids if bundle_root_ids is not None else a.state != "retired")
        )
        log.info(
            "keyring ready",
            extra={
                "intermediate_id": intermediate.id,
                "intermediate_not_after": intermediate.not_after,
                "roots": len(roots),
                "upstream": intermediate.upstream,
                "kek_id": kek.id,
            },
        )
        return cls(
            signer=signer,
            roots=roots,
            authorities=tuple(authorities),
            active_intermediate=intermediate,
        )

    def roots_der(self) -> list[bytes]:
        return [c.public_bytes(serialization.Encoding.DER) for c in self.roots]

    def roots_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)


def _parent_chain(intermediate: Authority, by_id: dict[str, Authority]) -> list[x509.Certificate]:
    """The certificates above `intermediate`, nearest first, root last."""
    parent = by_id.get(intermediate.parent_id or "")
    if parent is None:
        raise ConfigError(
            f"the root {intermediate.parent_id} of the active intermediate {intermediate.id} "
            "is not in the database"
        )
    if parent.state == "retired":
        raise ConfigError(
            f"the root {parent.id} of the active intermediate {intermediate.id} is retired: "
            "peers no longer trust what it would sign"
        )
    if intermediate.chain_pem.strip():
        try:
            return certs_from_pem(intermediate.chain_pem.encode())
        except ValueError as exc:
            raise ConfigError(
                f"the stored chain of intermediate {intermediate.id} is not valid PEM: {exc}"
            ) from None
    return [load_authority_cert(parent)]
