"""Does a peer holding `roots` accept this leaf at this time? X.509 path validation with
`cryptography`'s verifier, at a chosen (possibly accelerated) time."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError


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
