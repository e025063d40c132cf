"""The X509-SVID profile meshtls issues, as a checker both sides use.

The CA validates every certificate it signs against it before recording or returning it;
the sidecar validates what it receives before using it. The checks read the certificate's
own DER (`leaf_problems`), so the CA checks the very bytes it signed without building a
Python object per field; `profile_problems` adds the issuer's signature for receivers.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshtls.identity import der
from meshtls.identity.x509 import CertificateError, spiffe_id_from_uris

MIN_SERIAL_BITS = 128
# Leaves are backdated by this much so that peers whose clocks lag still accept them.
BACKDATE_SECONDS = 30

ISSUER_NAME_MISMATCH = "issuer name does not match the issuing CA's subject"

_REQUIRED_USAGES = {der.OID_SERVER_AUTH: "serverAuth", der.OID_CLIENT_AUTH: "clientAuth"}
# KeyUsage bits (RFC 5280 4.2.1.3), in the first content octet after the unused-bits one.
_DIGITAL_SIGNATURE = 0x80
_KEY_ENCIPHERMENT = 0x20
_KEY_CERT_SIGN = 0x04
_CRL_SIGN = 0x02


def issuer_key_identifier(issuer: x509.Certificate) -> bytes:
    """The key identifier a child's AKI must carry: the issuer's SKI extension when it has
    one (CAs may compute it by other methods than RFC 5280's SHA-1), else the SHA-1 one."""
    try:
        return issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest


@dataclass(frozen=True)
class IssuerFacts:
    """What the profile compares a leaf with: its issuer's subject (DER), key identifier
    and NotAfter. A signer computes them once."""

    subject_der: bytes
    key_identifier: bytes
    not_after: float

    @classmethod
    def of(cls, issuer: x509.Certificate) -> IssuerFacts:
        return cls(
            issuer.subject.public_bytes(),
            issuer_key_identifier(issuer),
            issuer.not_valid_after_utc.timestamp(),
        )


@dataclass
class _Extension:
    critical: bool
    value: bytes


def _extensions(cert: bytes, start: int, end: int) -> dict[bytes, _Extension]:
    """The extensions by OID (content octets), from the [3] element at `start`."""
    seq_start, seq_end = der.expect(cert, start, der.SEQUENCE, end)
    found: dict[bytes, _Extension] = {}
    for _, ext_start, ext_end in der.children(cert, seq_start, seq_end):
        parts = der.children(cert, ext_start, ext_end)
        oid_tag, oid_start, oid_end = parts[0]
        if oid_tag != der.OID:
            raise der.DerError("an extension does not start with its OID")
        critical = len(parts) == 3 and cert[parts[1][1] : parts[1][2]] == b"\xff"
        value_tag, value_start, value_end = parts[-1]
        if value_tag != der.OCTET_STRING:
            raise der.DerError("an extension's value is not an OCTET STRING")
        oid = cert[oid_start:oid_end]
        if oid in found:
            raise der.DerError("an extension appears twice")
        found[oid] = _Extension(critical, cert[value_start:value_end])
    return found


def _uris(san: bytes) -> list[str]:
    start, end = der.expect(san, 0, der.SEQUENCE)
    return [
        san[value_start:value_end].decode("ascii", "replace")
        for tag, value_start, value_end in der.children(san, start, end)
        if tag == der.SAN_URI
    ]


def _is_ca(basic_constraints: bytes) -> bool:
    start, end = der.expect(basic_constraints, 0, der.SEQUENCE)
    parts = der.children(basic_constraints, start, end)
    return bool(parts) and parts[0][0] == der.BOOLEAN and basic_constraints[parts[0][1]] != 0


def _key_usage_bits(key_usage: bytes) -> int:
    start, end = der.expect(key_usage, 0, der.BIT_STRING)
    return key_usage[start + 1] if end - start > 1 else 0


def _usages(eku: bytes) -> set[bytes]:
    start, end = der.expect(eku, 0, der.SEQUENCE)
    return {eku[s:e] for tag, s, e in der.children(eku, start, end) if tag == der.OID}


def _key_identifier(aki: bytes) -> bytes | None:
    start, end = der.expect(aki, 0, der.SEQUENCE)
    for tag, value_start, value_end in der.children(aki, start, end):
        if tag == der.KEY_IDENTIFIER:
            return aki[value_start:value_end]
    return None


def leaf_problems(leaf_der: bytes, issuer: IssuerFacts) -> list[str]:
    """Every way the DER certificate `leaf_der` breaks the X509-SVID leaf profile under
    `issuer`, read from its bytes; [] when none. The issuer name must be byte for byte the
    issuer's subject. The signature is not checked here (see `profile_problems`)."""
    try:
        return _leaf_problems(leaf_der, issuer)
    except (ValueError, IndexError) as exc:  # DerError, or fields missing or misplaced
        return [f"the certificate is not DER this profile can read: {exc}"]


def _leaf_problems(cert: bytes, issuer: IssuerFacts) -> list[str]:
    problems: list[str] = []
    cert_start, cert_end = der.expect(cert, 0, der.SEQUENCE)
    tbs_start, tbs_end = der.expect(cert, cert_start, der.SEQUENCE, cert_end)
    fields = der.children(cert, tbs_start, tbs_end)
    if fields[0][0] != der.EXPLICIT_0:
        problems.append("the certificate is not X.509 version 3")
        return problems
    (
        (_, _, _),
        (serial_tag, serial_start, serial_end),
        _signature,
        (_, _, issuer_end),
        (_, validity_start, validity_end),
        (_, subject_start, subject_end),
        (_, spki_start, spki_end),
    ) = fields[:7]
    extensions_at = [f for f in fields[7:] if f[0] == der.EXPLICIT_3]
    if serial_tag != der.INTEGER:
        raise der.DerError("the serial number is not an INTEGER")
    serial = int.from_bytes(cert[serial_start:serial_end], "big", signed=True)
    if serial.bit_length() < MIN_SERIAL_BITS - 8:
        problems.append(f"serial number must carry at least {MIN_SERIAL_BITS} random bits")
    # Each field starts where the one before it ends.
    if cert[fields[2][2] : issuer_end] != issuer.subject_der:
        problems.append(ISSUER_NAME_MISMATCH)
    (nb_tag, nb_start, nb_end), (na_tag, na_start, na_end) = der.children(
        cert, validity_start, validity_end
    )
    not_before = der.time_value(nb_tag, cert[nb_start:nb_end])
    not_after = der.time_value(na_tag, cert[na_start:na_end])
    if not_after > issuer.not_after:
        problems.append("the leaf outlives its issuer")
    if not_before >= not_after:
        problems.append("NotBefore is not before NotAfter")

    found = _extensions(cert, extensions_at[0][1], extensions_at[0][2]) if extensions_at else {}
    san = found.get(der.OID_SUBJECT_ALT_NAME)
    try:
        spiffe_id_from_uris(_uris(san.value) if san is not None else [])
    except CertificateError as exc:
        problems.append(str(exc))
    if subject_end == subject_start and san is not None and not san.critical:
        problems.append("with an empty subject the SubjectAlternativeName must be critical")
    bc = found.get(der.OID_BASIC_CONSTRAINTS)
    if bc is None or not bc.critical:
        problems.append("BasicConstraints must be present and critical")
    elif _is_ca(bc.value):
        problems.append("a leaf must not be a CA")
    ku = found.get(der.OID_KEY_USAGE)
    if ku is None or not ku.critical:
        problems.append("KeyUsage must be present and critical")
    else:
        bits = _key_usage_bits(ku.value)
        if not bits & _DIGITAL_SIGNATURE:
            problems.append("KeyUsage must include digitalSignature")
        if bits & (_KEY_CERT_SIGN | _CRL_SIGN):
            problems.append("a leaf's KeyUsage must not include keyCertSign or cRLSign")
        if bits & _KEY_ENCIPHERMENT and not _is_rsa(cert, spki_start, spki_end):
            problems.append("keyEncipherment is only for RSA keys")
    eku = found.get(der.OID_EXTENDED_KEY_USAGE)
    if eku is None:
        problems.append("ExtendedKeyUsage must be present")
    else:
        usages = _usages(eku.value)
        for oid, name in _REQUIRED_USAGES.items():
            if oid not in usages:
                problems.append(f"ExtendedKeyUsage must include {name}")
    if der.OID_SUBJECT_KEY_IDENTIFIER not in found:
        problems.append("SubjectKeyIdentifier must be present")
    aki = found.get(der.OID_AUTHORITY_KEY_IDENTIFIER)
    if aki is None:
        problems.append("AuthorityKeyIdentifier must be present")
    elif _key_identifier(aki.value) != issuer.key_identifier:
        problems.append("AuthorityKeyIdentifier does not match the issuer's key")
    return problems


def _is_rsa(cert: bytes, spki_start: int, spki_end: int) -> bool:
    algorithm_start, algorithm_end = der.expect(cert, spki_start, der.SEQUENCE, spki_end)
    oid_start, oid_end = der.expect(cert, algorithm_start, der.OID, algorithm_end)
    return cert[oid_start:oid_end] == der.OID_RSA_ENCRYPTION


def profile_problems(
    leaf: x509.Certificate, issuer: x509.Certificate, *, check_signature: bool = True
) -> list[str]:
    """Every way `leaf` breaks the X509-SVID leaf profile under `issuer`, including (unless
    `check_signature` is False) the issuer's signature; [] when none."""
    problems = leaf_problems(leaf.public_bytes(serialization.Encoding.DER), IssuerFacts.of(issuer))
    if ISSUER_NAME_MISMATCH in problems and leaf.issuer == issuer.subject:
        # The same name in another encoding (the byte comparison is the signer's fast path).
        problems.remove(ISSUER_NAME_MISMATCH)
    if not check_signature or ISSUER_NAME_MISMATCH in problems:
        return problems
    try:
        leaf.verify_directly_issued_by(issuer)
    except InvalidSignature:
        problems.append("the signature does not verify with the issuer's key")
    except (ValueError, TypeError) as exc:
        problems.append(f"the signature cannot be checked with the issuer's key: {exc}")
    return problems


def validate_leaf(
    leaf: x509.Certificate, issuer: x509.Certificate, *, check_signature: bool = True
) -> None:
    problems = profile_problems(leaf, issuer, check_signature=check_signature)
    if problems:
        raise CertificateError("certificate breaks the X509-SVID profile: " + "; ".join(problems))
