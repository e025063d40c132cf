"""Does a peer holding `roots` accept this leaf at this time? X.509 path validation with
`cryptography`'s verifier, at a chosen (possibly accelerated) time."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ca_server.services.context import CAContext
from ca_server.services.issuing import issue
from meshtls.identity.ids import SpiffeId
from meshtls.identity.x509 import SubjectPublicKey


def verifies(
    leaf: x509.Certificate,
    chain: list[x509.Certificate],
    roots: list[x509.Certificate],
    now: float,
) -> bool:
    """True when `leaf` (with the intermediates `chain`) chains to one of `roots` at `now`."""
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(dt.datetime.fromtimestamp(now, tz=dt.UTC))
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, chain)
    except VerificationError:
        return False
    return True


async def issue_recorded_leaf(
    ctx: CAContext, public_key: CertificatePublicKeyTypes, spiffe_id: SpiffeId, ttl: float
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """Sign a leaf with whatever signs now (at the CA's clock) and record it, as a renewing
    workload would get it; returns (leaf, the intermediates to send with it)."""
    signer = ctx.trust.keyring.signer
    issued = issue(
        signer,
        SubjectPublicKey.of(public_key),
        spiffe_id=spiffe_id,
        ttl_seconds=ttl,
        now=ctx.clock.now(),
        kind="workload",
        node_name="",
    )
    await ctx.record_issuance("", [issued.record], [])
    return issued.cert, list(signer.chain)
