"""A certificate revocation list (RFC 5280 section 5) for verifiers outside the mesh.

Sidecars learn about revocations from the revocation list the CA pushes to them; tools
that know nothing of meshtls (openssl, a load balancer, a Java service) check a CRL
instead. `build_crl` makes one, signed by the active intermediate, listing the revoked
certificates that intermediate issued:

- issuer = the intermediate's subject; Authority Key Identifier = its SKI;
- thisUpdate = now, backdated by `BACKDATE_SECONDS` like leaves (clock skew);
  nextUpdate = now + `next_update_seconds`;
- CRL number = `crl_number`, which the caller keeps monotonic (the trust-bundle version);
- one entry per revoked certificate of this issuer, sorted by serial, with its revocation
  date and a CRLReason entry extension when the free-text reason names a standard
  reason (see `reason_flag`); an unspecified reason has no extension (RFC 5280 5.3.1).

Nothing here reads the clock or the database: `now` and the records are passed in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_server.authority.signer import Signer
from ca_server.authority.templates import authority_key_identifier
from ca_server.domain import CertificateRecord
from meshtls.clock import utc
from meshtls.identity.profile import BACKDATE_SECONDS

log = logging.getLogger(__name__)

DEFAULT_NEXT_UPDATE_SECONDS = 3600.0
MAX_CRL_NUMBER = (1 << 159) - 1  # at most 20 octets, positive (RFC 5280 5.2.3)
MAX_SERIAL_BITS = 159  # a positive serial of at most 20 octets (RFC 5280 4.1.2.2)

# Reasons a full CRL may carry in a CRLReason extension. "unspecified" is expressed by
# leaving the extension out, and "removeFromCRL" belongs to delta CRLs only (RFC 5280
# 5.3.1), so neither is mapped.
_NOT_MAPPED = {x509.ReasonFlags.unspecified, x509.ReasonFlags.remove_from_crl}
_SEPARATORS_RE = re.compile(r"[\s_\-]+")
_REASONS: dict[str, x509.ReasonFlags] = {
    flag.value.lower(): flag for flag in x509.ReasonFlags if flag not in _NOT_MAPPED
}
_SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")


class CRLError(ValueError):
    """A CRL cannot be built from these inputs (a bad record or argument); the message
    says which and why."""


def reason_flag(reason: str | None) -> x509.ReasonFlags | None:
    """The standard CRLReason a free-text revocation reason names, or None (unspecified).

    The text matches when, ignoring case, spaces, '_' and '-', it is a standard reason name
    (keyCompromise, cACompromise, affiliationChanged, superseded, cessationOfOperation,
    certificateHold, privilegeWithdrawn, aACompromise), alone or followed by ':' and a
    comment: "keyCompromise", "key compromise", "KEY_COMPROMISE: laptop stolen".
    """
    if not reason:
        return None
    head = reason.split(":", 1)[0]
    return _REASONS.get(_SEPARATORS_RE.sub("", head).lower())


def _serial_number(record: CertificateRecord) -> int:
    if not _SERIAL_RE.fullmatch(record.serial):
        raise CRLError(
            f"certificate record serial {record.serial!r} is not 1 to 40 lower-case hex digits"
        )
    serial = int(record.serial, 16)
    if serial == 0 or serial.bit_length() > MAX_SERIAL_BITS:
        raise CRLError(
            f"certificate record serial {record.serial!r} is not a positive number of at most "
            f"{MAX_SERIAL_BITS} bits (RFC 5280 4.1.2.2)"
        )
    return serial


def _revocation_time(record: CertificateRecord) -> float:
    if record.revoked_at is None:
        raise CRLError(
            f"certificate {record.serial} is not revoked (revoked_at is empty); "
            "only revoked certificates belong in a CRL"
        )
    return record.revoked_at


def _revoked_entry(record: CertificateRecord, serial: int) -> x509.RevokedCertificate:
    builder = (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(utc(_revocation_time(record)))
    )
    flag = reason_flag(record.revocation_reason)
    if flag is not None:
        builder = builder.add_extension(x509.CRLReason(flag), critical=False)
    return builder.build()


def build_crl(
    signer: Signer,
    revoked: Sequence[CertificateRecord],
    *,
    now: float,
    next_update_seconds: float = DEFAULT_NEXT_UPDATE_SECONDS,
    crl_number: int,
) -> x509.CertificateRevocationList:
    """A CRL signed by `signer`'s intermediate listing the certificates in `revoked` that
    it issued (`issuer_id == signer.authority_id`; records of other issuers are skipped).

    Raises CRLError when `next_update_seconds` is not positive, `crl_number` is not a
    20-octet non-negative integer, or a record of this issuer is not revoked or has a
    malformed serial. A serial listed twice appears once, with its earliest revocation.
    """
    if not next_update_seconds > 0:
        raise CRLError(
            f"next_update_seconds must be a positive number of seconds, got {next_update_seconds}"
        )
    if not 0 <= crl_number <= MAX_CRL_NUMBER:
        raise CRLError(
            f"crl_number must be between 0 and 2**159 - 1 (20 octets), got {crl_number}; "
            "pass the trust-bundle version"
        )
    entries: dict[int, CertificateRecord] = {}
    skipped = 0
    for record in revoked:
        if record.issuer_id != signer.authority_id:
            skipped += 1
            continue
        serial = _serial_number(record)
        earlier = entries.get(serial)
        revoked_at = _revocation_time(record)
        if earlier is None or revoked_at < _revocation_time(earlier):
            entries[serial] = record
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(signer.cert.subject)
        .last_update(utc(now - BACKDATE_SECONDS))
        .next_update(utc(now + next_update_seconds))
        .add_extension(authority_key_identifier(signer.cert), critical=False)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
    )
    for serial in sorted(entries):
        builder = builder.add_revoked_certificate(_revoked_entry(entries[serial], serial))
    crl = signer.sign_crl(builder)
    log.info(
        "built CRL",
        extra={
            "authority_id": signer.authority_id,
            "crl_number": crl_number,
            "entries": len(entries),
            "other_issuer_records": skipped,
            "next_update": now + next_update_seconds,
        },
    )
    return crl


def crl_der(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.DER)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)
