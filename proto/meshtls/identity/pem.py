"""PEM/DER conversions for certificate chains, and atomic file writes."""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def der_to_pem(der: bytes) -> str:
    """One DER certificate as PEM text, without parsing it (what `cryptography` writes)."""
    body = base64.b64encode(der).decode("ascii")
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def certs_to_der(certs: Iterable[x509.Certificate]) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def certs_from_der(blobs: Sequence[bytes]) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(b) for b in blobs]


def certs_from_pem(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; ValueError if there is none."""
    certs = x509.load_pem_x509_certificates(data)
    if not certs:
        raise ValueError("no PEM certificate found")
    return certs


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write data to path so that readers see either the old or the new content.

    The data goes to a temporary file in the same directory (created with `mode`), is
    flushed to disk, then renamed over `path`; the directory is synced too, so the new
    content survives a crash once this returns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
