"""The X509-SVID profile meshtls issues, as a checker both sides use.

The CA validates every certificate against it before recording or returning it; the
sidecar validates what it receives before using it.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from meshtls.identity.x509 import CertificateError, spiffe_id_from_uris

MIN_SERIAL_BITS = 128
# Leaves are backdated by this much so that peers whose clocks lag still accept them.
BACKDATE_SECONDS = 30


def issuer_key_identifier(issuer: x509.Certificate) -> bytes:
    """The key identifier a child's AKI must carry: the issuer's SKI extension when it has
    one (CAs may compute it by other methods than RFC 5280's SHA-1), else the SHA-1 one."""
    try:
        return issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest


def profile_problems(
    leaf: x509.Certificate, issuer: x509.Certificate, *, check_signature: bool = True
) -> list[str]:
    """Every way `leaf` breaks the X509-SVID leaf profile under `issuer`; [] when none.

    `check_signature=False` skips only the cryptographic signature check, for the signer
    that has just produced it with `issuer`'s key and name (the authority key identifier is
    still checked); everyone who receives a certificate checks the signature.
    """
    problems: list[str] = []
    # One pass over the extensions (the CA runs this for every certificate it signs).
    by_oid = {extension.oid: extension for extension in leaf.extensions}
    get = by_oid.get

    san = get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    uris = (
        san.value.get_values_for_type(x509.UniformResourceIdentifier)
        if san is not None and isinstance(san.value, x509.SubjectAlternativeName)
        else []
    )
    try:
        spiffe_id_from_uris(uris)
    except CertificateError as exc:
        problems.append(str(exc))
    if len(leaf.subject) == 0 and san is not None and not san.critical:
        problems.append("with an empty subject the SubjectAlternativeName must be critical")
    bc = get(ExtensionOID.BASIC_CONSTRAINTS)
    if bc is None or not bc.critical or not isinstance(bc.value, x509.BasicConstraints):
        problems.append("BasicConstraints must be present and critical")
    elif bc.value.ca:
        problems.append("a leaf must not be a CA")
    ku = get(ExtensionOID.KEY_USAGE)
    if ku is None or not ku.critical or not isinstance(ku.value, x509.KeyUsage):
        problems.append("KeyUsage must be present and critical")
    else:
        if not ku.value.digital_signature:
            problems.append("KeyUsage must include digitalSignature")
        if ku.value.key_cert_sign or ku.value.crl_sign:
            problems.append("a leaf's KeyUsage must not include keyCertSign or cRLSign")
        if ku.value.key_encipherment and not isinstance(leaf.public_key(), rsa.RSAPublicKey):
            problems.append("keyEncipherment is only for RSA keys")
    eku = get(ExtensionOID.EXTENDED_KEY_USAGE)
    if eku is None or not isinstance(eku.value, x509.ExtendedKeyUsage):
        problems.append("ExtendedKeyUsage must be present")
    else:
        usages = set(eku.value)
        for need in (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH):
            if need not in usages:
                problems.append(f"ExtendedKeyUsage must include {need._name}")
    if get(ExtensionOID.SUBJECT_KEY_IDENTIFIER) is None:
        problems.append("SubjectKeyIdentifier must be present")
    aki = get(ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    if aki is None or not isinstance(aki.value, x509.AuthorityKeyIdentifier):
        problems.append("AuthorityKeyIdentifier must be present")
    elif aki.value.key_identifier != issuer_key_identifier(issuer):
        problems.append("AuthorityKeyIdentifier does not match the issuer's key")
    if leaf.serial_number.bit_length() < MIN_SERIAL_BITS - 8:
        problems.append(f"serial number must carry at least {MIN_SERIAL_BITS} random bits")
    if leaf.not_valid_after_utc > issuer.not_valid_after_utc:
        problems.append("the leaf outlives its issuer")
    if leaf.not_valid_before_utc >= leaf.not_valid_after_utc:
        problems.append("NotBefore is not before NotAfter")
    if not check_signature:
        return problems
    try:
        leaf.verify_directly_issued_by(issuer)
    except InvalidSignature:
        problems.append("the signature does not verify with the issuer's key")
    except (ValueError, TypeError) as exc:
        # Raised before the signature is checked, e.g. when the names differ. Comparing
        # names up front instead would cost more than the signature check on the CA's hot
        # path (cryptography builds Python Name objects for it).
        if leaf.issuer != issuer.subject:
            problems.append("issuer name does not match the issuing CA's subject")
        else:
            problems.append(f"the signature cannot be checked with the issuer's key: {exc}")
    return problems


def validate_leaf(
    leaf: x509.Certificate, issuer: x509.Certificate, *, check_signature: bool = True
) -> None:
    problems = profile_problems(leaf, issuer, check_signature=check_signature)
    if problems:
        raise CertificateError("certificate breaks the X509-SVID profile: " + "; ".join(problems))
