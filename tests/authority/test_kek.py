"""The key-encryption key: AES-256-GCM round trip, failures that explain themselves, and
key files that are refused unless private."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest

from ca_server.authority.kek import (
    MAGIC,
    Kek,
    KekError,
    generate_kek_file,
    load_kek_env,
    load_kek_file,
)
from ca_server.errors import ConfigError

SECRET = b"-----BEGIN PRIVATE KEY-----\nnot really but secret all the same\n"


def test_round_trip_and_format() -> None:
    kek = Kek.generate()
    blob = kek.encrypt(SECRET, b"authority-1")
    assert blob.startswith(MAGIC)
    assert SECRET not in blob
    assert kek.decrypt(blob, b"authority-1") == SECRET
    # A fresh random nonce every time: the same plaintext never gives the same blob.
    assert kek.encrypt(SECRET, b"authority-1") != blob


def test_wrong_kek_fails_clearly() -> None:
    blob = Kek.generate().encrypt(SECRET, b"abc123")
    other = Kek.generate()
    with pytest.raises(KekError, match="cannot decrypt CA key abc123: wrong KEK or corrupted"):
        other.decrypt(blob, b"abc123")


@pytest.mark.parametrize("position", [len(MAGIC), len(MAGIC) + 12, -1])
def test_tampered_blob_fails(position: int) -> None:
    kek = Kek.generate()
    blob = bytearray(kek.encrypt(SECRET, b"abc123"))
    blob[position] ^= 0x80
    with pytest.raises(KekError, match="wrong KEK or corrupted data"):
        kek.decrypt(bytes(blob), b"abc123")


def test_ciphertext_is_bound_to_its_authority_id() -> None:
    kek = Kek.generate()
    blob = kek.encrypt(SECRET, b"authority-1")
    with pytest.raises(KekError, match="cannot decrypt CA key authority-2"):
        kek.decrypt(blob, b"authority-2")


@pytest.mark.parametrize("blob", [b"", b"mkek1", b"xxxxx" + bytes(40), b"mkek2" + bytes(40)])
def test_malformed_blob_fails(blob: bytes) -> None:
    with pytest.raises(KekError, match="cannot decrypt CA key k1"):
        Kek.generate().decrypt(blob, b"k1")


def test_repr_and_id_never_reveal_the_key() -> None:
    raw = os.urandom(32)
    kek = Kek(raw)
    text = repr(kek) + str(kek)
    for form in (raw.hex(), base64.b64encode(raw).decode(), repr(raw)):
        assert form not in text
    assert kek.id in text
    assert len(kek.id) == 8
    assert Kek(raw).id == kek.id
    assert Kek.generate().id != kek.id


def test_kek_must_be_32_bytes() -> None:
    with pytest.raises(KekError, match="32 bytes"):
        Kek(b"short")


def test_kek_error_is_a_config_error() -> None:
    assert issubclass(KekError, ConfigError)


def test_generate_then_load_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "kek"
    created = generate_kek_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 44
    loaded = load_kek_file(path)
    assert loaded.id == created.id
    assert loaded.decrypt(created.encrypt(SECRET, b"a"), b"a") == SECRET


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    first = generate_kek_file(path)
    before = path.read_bytes()
    with pytest.raises(KekError, match="refusing to overwrite"):
        generate_kek_file(path)
    assert path.read_bytes() == before
    assert load_kek_file(path).id == first.id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "kek"
    generate_kek_file(path)
    path.chmod(mode)
    with pytest.raises(KekError, match=re.escape(f"chmod 600 {path}")):
        load_kek_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (base64.b64encode(os.urandom(16)).decode(), "holds 16 bytes"),
        (base64.b64encode(os.urandom(48)).decode(), "holds 48 bytes"),
        ("not base64 at all!!", "valid base64"),
        ("", "holds 0 bytes"),
    ],
)
def test_file_with_wrong_content_is_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "kek"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KekError, match=message):
        load_kek_file(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KekError, match="does not exist"):
        load_kek_file(tmp_path / "nope")
    with pytest.raises(KekError, match="not a regular file"):
        load_kek_file(tmp_path)


def test_error_messages_never_echo_the_file_content(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    secret_text = base64.b64encode(b"s" * 31).decode()
    path.write_text(secret_text)
    path.chmod(0o600)
    with pytest.raises(KekError) as info:
        load_kek_file(path)
    assert secret_text not in str(info.value)


def test_load_from_environment_value() -> None:
    raw = os.urandom(32)
    kek = load_kek_env(base64.b64encode(raw).decode() + "\n")
    assert kek.id == Kek(raw).id
    with pytest.raises(KekError, match="environment variable MESHTLS_CA_KEK is empty"):
        load_kek_env("  ")
    with pytest.raises(KekError, match="environment variable CA_KEK holds 3 bytes"):
        load_kek_env(base64.b64encode(b"abc").decode(), "CA_KEK")
