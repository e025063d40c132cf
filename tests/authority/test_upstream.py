"""Upstream mode: the operator's intermediate, key and chain are loaded, or refused with a
message that names the problem."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from ca_server.authority.kek import Kek
from ca_server.authority.keyring import Keyring
from ca_server.authority.keys import decrypt_private_key
from ca_server.authority.upstream import load_upstream
from ca_server.errors import ConfigError
from meshtls.identity.ids import SpiffeId
from meshtls.identity.profile import validate_leaf
from meshtls.identity.x509 import fingerprint_sha256
from tests.support.pki import ThrowawayCA, make_key

SID = SpiffeId.parse("spiffe://example.org/svc/web")


def write_files(
    tmp_path: Path, intermediate: ThrowawayCA, chain: bytes, *, key_pem: bytes | None = None
) -> tuple[Path, Path, Path]:
    cert_file, key_file = intermediate.write(tmp_path, "upstream")
    if key_pem is not None:
        key_file.write_bytes(key_pem)
    chain_file = tmp_path / "chain.pem"
    chain_file.write_bytes(chain)
    return cert_file, key_file, chain_file


def test_valid_operator_intermediate_loads_and_signs(tmp_path: Path, kek: Kek) -> None:
    now = time.time()
    root = ThrowawayCA.root(common_name="Corp Root")
    inter = root.intermediate(common_name="Corp meshtls issuing CA")
    files = write_files(tmp_path, inter, root.cert_pem)
    authorities = load_upstream(*files, kek, now)
    up_root, up_inter = authorities
    assert (up_root.kind, up_root.state, up_root.upstream, up_root.encrypted_key) == (
        "root",
        "active",
        True,
        None,
    )
    assert up_root.fingerprint_sha256 == fingerprint_sha256(root.cert)
    assert (up_inter.kind, up_inter.state, up_inter.upstream) == ("intermediate", "active", True)
    assert up_inter.parent_id == up_root.id
    assert up_inter.fingerprint_sha256 == fingerprint_sha256(inter.cert)
    assert up_inter.chain_pem.encode() == root.cert_pem
    assert up_inter.encrypted_key is not None
    assert inter.key_pem not in up_inter.encrypted_key
    assert decrypt_private_key(up_inter, kek).public_key() == inter.cert.public_key()

    keyring = Keyring.from_authorities(authorities, kek)
    assert list(keyring.roots) == [root.cert]
    assert keyring.signer.chain == [inter.cert]
    assert keyring.signer.trust_domain is None
    leaf = keyring.signer.issue(make_key().public_key(), SID, ttl_seconds=600, now=now)
    validate_leaf(leaf, inter.cert)


def test_chain_with_an_upstream_intermediate(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root(common_name="Corp Root", path_length=None)
    middle = root.intermediate(common_name="Corp Policy CA", path_length=1)
    inter = middle.intermediate(common_name="Corp meshtls CA")
    files = write_files(tmp_path, inter, middle.cert_pem + root.cert_pem)
    authorities = load_upstream(*files, kek, time.time())
    assert authorities[1].chain_pem.encode() == middle.cert_pem + root.cert_pem
    keyring = Keyring.from_authorities(authorities, kek)
    # Upstream intermediates travel with every leaf; the root does not.
    assert keyring.signer.chain == [inter.cert, middle.cert]
    assert list(keyring.roots) == [root.cert]


def test_chain_in_the_certificate_file_is_accepted(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root(path_length=None)
    middle = root.intermediate(common_name="middle", path_length=1)
    inter = middle.intermediate()
    cert_file, key_file, chain_file = write_files(tmp_path, inter, root.cert_pem)
    cert_file.write_bytes(inter.cert_pem + middle.cert_pem)
    authorities = load_upstream(cert_file, key_file, chain_file, kek, time.time())
    assert Keyring.from_authorities(authorities, kek).signer.chain == [inter.cert, middle.cert]


def test_key_that_does_not_match(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root()
    inter = root.intermediate()
    other_key = root.intermediate().key_pem
    files = write_files(tmp_path, inter, root.cert_pem, key_pem=other_key)
    with pytest.raises(ConfigError, match=r"does not match the certificate .* not a pair"):
        load_upstream(*files, kek, time.time())


def test_not_a_ca_certificate(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root()
    files = write_files(tmp_path, root.intermediate(ca=False), root.cert_pem)
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        load_upstream(*files, kek, time.time())


def test_ca_without_key_cert_sign(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root()
    files = write_files(tmp_path, root.intermediate(key_cert_sign=False), root.cert_pem)
    with pytest.raises(ConfigError, match="lacks the keyCertSign key usage"):
        load_upstream(*files, kek, time.time())


def test_chain_from_another_ca_with_the_same_name(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root(common_name="Corp Root")
    impostor = ThrowawayCA.root(common_name="Corp Root")
    files = write_files(tmp_path, root.intermediate(), impostor.cert_pem)
    with pytest.raises(ConfigError, match=r"chain does not verify: .*key did not sign it"):
        load_upstream(*files, kek, time.time())


def test_chain_without_the_root(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root(path_length=None)
    middle = root.intermediate(common_name="middle", path_length=1)
    files = write_files(tmp_path, middle.intermediate(), middle.cert_pem)
    with pytest.raises(ConfigError, match=r"chain does not verify: no certificate .* issued"):
        load_upstream(*files, kek, time.time())


def test_chain_with_an_unrelated_certificate(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root()
    stranger = ThrowawayCA.root(common_name="someone else")
    files = write_files(tmp_path, root.intermediate(), root.cert_pem + stranger.cert_pem)
    with pytest.raises(ConfigError, match="not on the path from the intermediate to its root"):
        load_upstream(*files, kek, time.time())


def test_root_path_length_too_small(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root(path_length=0)
    files = write_files(tmp_path, root.intermediate(), root.cert_pem)
    with pytest.raises(ConfigError, match="has pathLen 0 but 1 CA certificate"):
        load_upstream(*files, kek, time.time())


def test_expired_or_future_intermediate(tmp_path: Path, kek: Kek) -> None:
    now = time.time()
    root = ThrowawayCA.root()
    expired = root.intermediate(not_before=now - 7200, not_after=now - 60)
    with pytest.raises(ConfigError, match=r"upstream intermediate .* expired at"):
        load_upstream(*write_files(tmp_path, expired, root.cert_pem), kek, now)
    future = root.intermediate(not_before=now + 3600)
    with pytest.raises(ConfigError, match="is not valid before"):
        load_upstream(*write_files(tmp_path, future, root.cert_pem), kek, now)


def test_expired_root(tmp_path: Path, kek: Kek) -> None:
    now = time.time()
    root = ThrowawayCA.root(not_before=now - 7200, not_after=now - 60)
    inter = root.intermediate(not_before=now - 7200, not_after=now + 3600)
    with pytest.raises(ConfigError, match=r"upstream root .* expired at"):
        load_upstream(*write_files(tmp_path, inter, root.cert_pem), kek, now)


def test_self_signed_certificate_given_as_intermediate(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root()
    files = write_files(tmp_path, root, root.cert_pem)
    with pytest.raises(ConfigError, match="is self-signed"):
        load_upstream(*files, kek, time.time())


def test_weak_intermediate_key(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root()
    files = write_files(tmp_path, root.intermediate(key=make_key("rsa1024")), root.cert_pem)
    with pytest.raises(ConfigError, match="too weak"):
        load_upstream(*files, kek, time.time())


def test_encrypted_or_garbage_key_file(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root()
    inter = root.intermediate()
    encrypted = inter.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    files = write_files(tmp_path, inter, root.cert_pem, key_pem=encrypted)
    with pytest.raises(ConfigError, match="encrypted with a passphrase"):
        load_upstream(*files, kek, time.time())
    files = write_files(tmp_path, inter, root.cert_pem, key_pem=b"not a key")
    with pytest.raises(ConfigError, match="does not hold a PEM private key"):
        load_upstream(*files, kek, time.time())


def test_missing_and_malformed_files(tmp_path: Path, kek: Kek) -> None:
    root = ThrowawayCA.root()
    cert_file, key_file, chain_file = write_files(tmp_path, root.intermediate(), root.cert_pem)
    with pytest.raises(ConfigError, match=r"upstream certificate file .* does not exist"):
        load_upstream(tmp_path / "nope.pem", key_file, chain_file, kek, time.time())
    with pytest.raises(ConfigError, match=r"upstream key file .* does not exist"):
        load_upstream(cert_file, tmp_path / "nope.key", chain_file, kek, time.time())
    chain_file.write_bytes(b"hello")
    with pytest.raises(ConfigError, match=r"upstream chain file .* does not hold PEM"):
        load_upstream(cert_file, key_file, chain_file, kek, time.time())
