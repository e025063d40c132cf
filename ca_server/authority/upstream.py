"""Upstream mode: the CA signs with an intermediate the operator's own PKI issued.

`load_upstream` reads the operator's intermediate certificate, its private key and the
chain above it, checks each part (with its own error message for each failure), and
returns Authority records: the operator's root (no key: it is not ours) and the
intermediate (its key encrypted under the KEK). Peers then trust the operator's root.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek
from ca_server.authority.keys import CAPrivateKey, as_ca_key, encrypt_private_key, public_key_der
from ca_server.authority.material import authority_record, cert_pem, new_authority_id
from ca_server.authority.signer import is_self_signed
from ca_server.domain import Authority
from ca_server.errors import ConfigError
from meshtls.clock import utc
from meshtls.identity.x509 import CertificateError, check_public_key, fingerprint_sha256

log = logging.getLogger(__name__)

MAX_CHAIN_DEPTH = 8


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def _read_certs(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what} {path} does not hold PEM certificates: {exc}") from None
    if not certs:
        raise ConfigError(f"{what} {path} holds no PEM certificate")
    return certs


def _read_key(path: Path) -> CAPrivateKey:
    data = _read(path, "upstream key file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "upstream CA key file is readable by group or others; run chmod 600 on it",
            extra={"path": str(path), "mode": f"{mode:04o}"},
        )
    return _parse_key(data, f"upstream key file {path}")


def _parse_key(data: bytes, what: str) -> CAPrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{what} is encrypted with a passphrase; give it unencrypted "
            "(meshtls stores it encrypted under its KEK)"
        ) from None
    except ValueError:
        raise ConfigError(f"{what} does not hold a PEM private key") from None
    try:
        return as_ca_key(key, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _describe(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()!r} (serial {cert.serial_number:x})"


def _check_ca(cert: x509.Certificate, what: str, *, key_usage_required: bool) -> None:
    bc = _ext(cert, x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
        raise ConfigError(
            f"{what} {_describe(cert)} is not a CA certificate (BasicConstraints CA is not "
            "true); the CA needs a certificate that may sign other certificates"
        )
    ku = _ext(cert, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage):
        if not ku.key_cert_sign:
            raise ConfigError(f"{what} {_describe(cert)} lacks the keyCertSign key usage")
    elif key_usage_required:
        raise ConfigError(f"{what} {_describe(cert)} has no KeyUsage with keyCertSign")


def _check_time(cert: x509.Certificate, what: str, now: float) -> None:
    if cert.not_valid_before_utc.timestamp() > now:
        raise ConfigError(
            f"{what} {_describe(cert)} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()} (now {utc(now).isoformat()})"
        )
    if cert.not_valid_after_utc.timestamp() <= now:
        raise ConfigError(
            f"{what} {_describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}"
        )


def _issuer_of(cert: x509.Certificate, candidates: Sequence[x509.Certificate]) -> x509.Certificate:
    """The candidate that signed `cert`; ConfigError saying why none did."""
    named = [c for c in candidates if c.subject == cert.issuer and c is not cert]
    for candidate in named:
        try:
            cert.verify_directly_issued_by(candidate)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return candidate
    if named:
        raise ConfigError(
            f"the chain does not verify: the chain file holds {_describe(named[0])}, whose name "
            f"matches the issuer of {_describe(cert)}, but its key did not sign it (the "
            "signature does not verify); the chain belongs to a different CA"
        )
    raise ConfigError(
        f"the chain does not verify: no certificate in the chain file issued "
        f"{_describe(cert)} (its issuer is {cert.issuer.rfc4514_string()!r}); the chain "
        "file must hold every certificate up to and including the self-signed root"
    )


def build_path(
    intermediate: x509.Certificate, candidates: Sequence[x509.Certificate], now: float
) -> list[x509.Certificate]:
    """The certificates from `intermediate`'s issuer up to a self-signed root, all drawn
    from `candidates` and each checked (CA, keyCertSign, validity, path length)."""
    path: list[x509.Certificate] = []
    current = intermediate
    while not path or not is_self_signed(path[-1]):
        if len(path) >= MAX_CHAIN_DEPTH:
            raise ConfigError(f"the upstream chain is longer than {MAX_CHAIN_DEPTH} certificates")
        issuer = _issuer_of(current, candidates)
        what = "upstream root" if is_self_signed(issuer) else "upstream chain certificate"
        _check_ca(issuer, what, key_usage_required=False)
        _check_time(issuer, what, now)
        bc = _ext(issuer, x509.BasicConstraints)
        # The intermediates that follow `issuer` in a path to our leaves: every
        # certificate collected so far plus the operator's intermediate itself.
        below = len(path) + 1
        if (
            isinstance(bc, x509.BasicConstraints)
            and bc.path_length is not None
            and bc.path_length < below
        ):
            raise ConfigError(
                f"{what} {_describe(issuer)} has pathLen {bc.path_length} but {below} CA "
                "certificate(s) sit below it; peers would reject every certificate "
                "meshtls signs"
            )
        path.append(issuer)
        current = issuer
    return path


def load_upstream(
    cert_file: Path, key_file: Path, chain_file: Path, kek: Kek, now: float
) -> list[Authority]:
    """[upstream root, intermediate] from the operator's files; ConfigError naming the
    first problem found."""
    certs = _read_certs(cert_file, "upstream certificate file")
    intermediate = certs[0]
    what = "upstream intermediate"
    if is_self_signed(intermediate):
        raise ConfigError(
            f"{what} {_describe(intermediate)} in {cert_file} is self-signed (a root); give "
            "an intermediate your root signed, and the root in the chain file"
        )
    _check_ca(intermediate, what, key_usage_required=True)
    _check_time(intermediate, what, now)
    try:
        check_public_key(intermediate.public_key())
    except CertificateError as exc:
        raise ConfigError(f"{what} {_describe(intermediate)}: {exc}") from None
    key = _read_key(key_file)
    if public_key_der(key.public_key()) != public_key_der(intermediate.public_key()):
        raise ConfigError(
            f"the key in {key_file} does not match the certificate in {cert_file}: they are "
            "not a pair"
        )
    chain_certs = _read_certs(chain_file, "upstream chain file")
    extra = [*chain_certs, *certs[1:]]
    path = build_path(intermediate, extra, now)
    on_path = {fingerprint_sha256(c) for c in (intermediate, *path)}
    for cert in extra:
        if fingerprint_sha256(cert) not in on_path:
            raise ConfigError(
                f"the chain file {chain_file} holds {_describe(cert)}, which is not on the path "
                f"from the intermediate to its root; it must hold only that path"
            )
    root = path[-1]
    root_id = new_authority_id()
    intermediate_id = new_authority_id()
    root_record = authority_record(
        root,
        authority_id=root_id,
        kind="root",
        state="active",
        parent_id=None,
        encrypted_key=None,
        upstream=True,
        created_at=now,
    )
    intermediate_record = authority_record(
        intermediate,
        authority_id=intermediate_id,
        kind="intermediate",
        state="active",
        parent_id=root_id,
        encrypted_key=encrypt_private_key(key, kek, intermediate_id),
        upstream=True,
        created_at=now,
        chain_pem="".join(cert_pem(c) for c in path),
    )
    log.info(
        "loaded upstream intermediate",
        extra={
            "intermediate_id": intermediate_id,
            "intermediate_subject": intermediate_record.subject,
            "intermediate_not_after": intermediate_record.not_after,
            "root_id": root_id,
            "root_subject": root_record.subject,
            "chain_length": len(path),
            "kek_id": kek.id,
        },
    )
    return [root_record, intermediate_record]
