"""The key-encryption key (KEK) that protects the CA's private keys at rest.

CA private keys are stored in the database only as AES-256-GCM ciphertext under the KEK;
the KEK itself lives outside the database (a file readable only by the CA's user, or an
environment variable). The associated data binds each ciphertext to one authority id, so
a ciphertext copied to another row does not decrypt.

Blob format: b"mkek1" || 12-byte random nonce || ciphertext-and-tag.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ca_server.errors import ConfigError

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAGIC = b"mkek1"
ENCODED_LENGTH = 44  # base64 of 32 bytes, with padding


class KekError(ConfigError):
    """The KEK cannot be loaded, or a ciphertext does not decrypt under it."""


class Kek:
    """A 256-bit AES-GCM key-encryption key. `repr()` shows only the KEK id."""

    __slots__ = ("_aead", "_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise KekError(f"a KEK must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._id = hashlib.sha256(key).hexdigest()[:8]

    @classmethod
    def generate(cls) -> Kek:
        return cls(secrets.token_bytes(KEY_BYTES))

    @property
    def id(self) -> str:
        """First 8 hex digits of SHA-256 of the key: safe to log, tells KEKs apart."""
        return self._id

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of `blob`; KekError if the KEK is wrong or the blob was altered.

        `aad` is the authority id the blob was encrypted for; it names the key in errors.
        """
        what = aad.decode("utf-8", errors="replace")
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + TAG_BYTES:
            raise KekError(
                f"cannot decrypt CA key {what}: the stored data is not in the meshtls KEK "
                f"format ({MAGIC.decode()}); it is corrupted"
            )
        nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], aad)
        except InvalidTag:
            raise KekError(
                f"cannot decrypt CA key {what}: wrong KEK or corrupted data "
                f"(this KEK has id {self._id})"
            ) from None

    def __repr__(self) -> str:
        return f"Kek(id={self._id})"

    __str__ = __repr__


def _decode(text: str, source: str) -> Kek:
    cleaned = text.strip()
    try:
        key = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise KekError(
            f"{source} does not hold valid base64; it must hold {KEY_BYTES} random bytes as "
            f"base64 ({ENCODED_LENGTH} characters), e.g. from `meshtls-ca kek generate`"
        ) from None
    if len(key) != KEY_BYTES:
        raise KekError(
            f"{source} holds {len(key)} bytes; a KEK must be {KEY_BYTES} bytes as base64 "
            f"({ENCODED_LENGTH} characters)"
        )
    return Kek(key)


def load_kek_file(path: Path) -> Kek:
    """Read a KEK from a file holding it as base64. The file must not be readable by
    group or others."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KekError(f"KEK file {path} does not exist") from None
    except OSError as exc:
        raise KekError(f"cannot read KEK file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KekError(f"KEK file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KekError(
            f"KEK file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"
        )
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise KekError(f"KEK file {path} does not hold base64 text") from None
    except OSError as exc:
        raise KekError(f"cannot read KEK file {path}: {exc.strerror}") from None
    kek = _decode(text, f"KEK file {path}")
    log.info("loaded KEK", extra={"kek_id": kek.id, "source": str(path)})
    return kek


def load_kek_env(value: str, name: str = "MESHTLS_CA_KEK") -> Kek:
    """Parse a KEK given as base64 in an environment variable called `name`."""
    if not value.strip():
        raise KekError(f"environment variable {name} is empty")
    kek = _decode(value, f"environment variable {name}")
    log.info("loaded KEK", extra={"kek_id": kek.id, "source": f"env:{name}"})
    return kek


def generate_kek_file(path: Path) -> Kek:
    """Create a new random KEK in `path` (mode 0600). Never overwrites an existing file."""
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KekError(
            f"refusing to overwrite the existing KEK file {path}: every CA key encrypted under "
            "it would be lost; move it away first if you really mean to replace it"
        ) from None
    except OSError as exc:
        raise KekError(f"cannot create KEK file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(base64.b64encode(key) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    kek = Kek(key)
    log.info("generated KEK", extra={"kek_id": kek.id, "path": str(path)})
    return kek
