"""Checks on every certificate the sidecar accepts, from the CA or from its state dir.

An SVID is accepted only if its leaf follows the X509-SVID profile, carries the expected
SPIFFE ID, certifies our private key, has not expired, and its chain links up to a root of
the trust bundle.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from meshtls.identity.ids import SpiffeId
from meshtls.identity.profile import profile_problems
from meshtls.identity.x509 import CertificateError, fingerprint_sha256, spiffe_id_of
from sidecar.identity.keys import key_matches
from sidecar.identity.model import Svid, TrustBundle

# A certificate that starts this far in our future is rejected as "not yet valid"; less
# is tolerated as clock skew between the CA and this host.
MAX_FUTURE_SKEW_SECONDS = 300.0


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_bundle(bundle: TrustBundle, trust_domain: str) -> None:
    """The bundle belongs to our trust domain and holds at least one root."""
    if bundle.trust_domain and bundle.trust_domain != trust_domain:
        raise CertificateError(
            f"the trust bundle is for trust domain {bundle.trust_domain!r}, "
            f"expected {trust_domain!r}"
        )
    if not bundle.roots:
        raise CertificateError("the trust bundle holds no root certificate")


def verify_svid(svid: Svid, bundle: TrustBundle, now: float, expected: SpiffeId) -> None:
    """Raise CertificateError (the message says what is wrong) unless `svid` is usable."""
    try:
        _verify(svid, bundle, now, expected)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, CertificateError):
            raise
        raise CertificateError(f"the certificate cannot be checked: {exc}") from None


def _verify(svid: Svid, bundle: TrustBundle, now: float, expected: SpiffeId) -> None:
    if not svid.chain:
        raise CertificateError("the certificate chain is empty")
    leaf = svid.leaf
    actual = spiffe_id_of(leaf)
    if actual != expected or svid.spiffe_id != expected:
        raise CertificateError(f"the certificate is for {actual}, expected {expected}")
    if not key_matches(svid.key, leaf):
        raise CertificateError("the certificate does not certify our private key")
    for cert in svid.chain:
        if now >= cert.not_valid_after_utc.timestamp():
            raise CertificateError(
                f"certificate {cert.subject.rfc4514_string() or actual} expired at "
                f"{cert.not_valid_after_utc.isoformat()}"
            )
        if cert.not_valid_before_utc.timestamp() > now + MAX_FUTURE_SKEW_SECONDS:
            raise CertificateError(
                f"certificate is not valid before {cert.not_valid_before_utc.isoformat()}; "
                "check this host's clock"
            )
    for child, parent in zip(svid.chain, svid.chain[1:], strict=False):
        if not _issued_by(child, parent):
            raise CertificateError(
                f"the chain is broken: {parent.subject.rfc4514_string()} did not sign "
                f"{child.subject.rfc4514_string() or actual}"
            )
    top = svid.chain[-1]
    root_fps = set(bundle.fingerprints())
    anchor = next((r for r in bundle.roots if _issued_by(top, r)), None)
    if anchor is None and fingerprint_sha256(top) not in root_fps:
        raise CertificateError(
            f"the chain does not lead to a root of trust bundle version {bundle.version}"
        )
    issuer = svid.chain[1] if len(svid.chain) > 1 else anchor
    if issuer is None:
        raise CertificateError("a self-signed leaf is not an X509-SVID")
    problems = profile_problems(leaf, issuer)
    if problems:
        raise CertificateError(
            "the certificate breaks the X509-SVID profile: " + "; ".join(problems)
        )


def chains_to(svid: Svid, bundle: TrustBundle) -> bool:
    """True when the top of the chain was signed by (or is) a root of `bundle`."""
    top = svid.chain[-1]
    fps = set(bundle.fingerprints())
    return fingerprint_sha256(top) in fps or any(_issued_by(top, r) for r in bundle.roots)
