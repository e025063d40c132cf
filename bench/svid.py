"""The X509-SVID-shaped leaf the benches build with plain `cryptography` (no meshtls code):
the raw signing rate of `issuance.py` and the throwaway PKI of the data-plane bench."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

_DIGITAL_SIGNATURE = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
_SERVER_AND_CLIENT = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def svid_builder(
    *,
    public_key: ec.EllipticCurvePublicKey,
    spiffe_id: str,
    issuer_name: x509.Name,
    issuer_public_key: ec.EllipticCurvePublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    """An unsigned leaf: empty subject, one URI SAN (critical), CA:false, digitalSignature,
    serverAuth + clientAuth, SKI and AKI."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_DIGITAL_SIGNATURE, critical=True)
        .add_extension(_SERVER_AND_CLIENT, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False
        )
    )
