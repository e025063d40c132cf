"""PROXY protocol version 2 headers, sent to the app before any byte of the connection.

The header carries the TLS peer's address and, in TLVs:
* PP2_TYPE_SSL (0x20) with the client flags (SSL, certificate presented on this
  connection, or in the resumed session) and the TLS version and cipher sub-TLVs;
* 0xE0 (the first custom type, `PP2_TYPE_MESHTLS_SPIFFE_ID`): the peer's SPIFFE ID as
  UTF-8, so that the app learns who called it without parsing certificates.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_COMMAND_PROXY = 0x21
FAMILY_TCP4, FAMILY_TCP6, FAMILY_UNSPEC = 0x11, 0x21, 0x00
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_TYPE_MESHTLS_SPIFFE_ID = 0xE0
PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS = 0x01, 0x02, 0x04

SockAddr = tuple[str, int] | tuple[str, int, int, int] | str | None


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def _addresses(source: SockAddr, dest: SockAddr) -> tuple[int, bytes]:
    if not isinstance(source, tuple) or not isinstance(dest, tuple):
        return FAMILY_UNSPEC, b""
    src_ip = ipaddress.ip_address(source[0])
    dst_ip = ipaddress.ip_address(dest[0])
    if src_ip.version != dst_ip.version:
        # An IPv4 peer on a dual-stack listener: express both as IPv6.
        src_ip = ipaddress.IPv6Address(f"::ffff:{src_ip}") if src_ip.version == 4 else src_ip
        dst_ip = ipaddress.IPv6Address(f"::ffff:{dst_ip}") if dst_ip.version == 4 else dst_ip
    family = FAMILY_TCP4 if src_ip.version == 4 else FAMILY_TCP6
    body = src_ip.packed + dst_ip.packed + struct.pack("!HH", source[1], dest[1])
    return family, body


def encode_v2(
    source: SockAddr,
    dest: SockAddr,
    *,
    spiffe_id: str,
    tls_version: str | None,
    cipher: str | None,
    resumed: bool,
) -> bytes:
    """A PROXY v2 header for a connection from `source` to `dest` by `spiffe_id`."""
    family, body = _addresses(source, dest)
    ssl_sub = b""
    if tls_version:
        ssl_sub += _tlv(PP2_SUBTYPE_SSL_VERSION, tls_version.encode())
    if cipher:
        ssl_sub += _tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.encode())
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_SESS if resumed else PP2_CLIENT_CERT_CONN)
    tlvs = _tlv(PP2_TYPE_SSL, struct.pack("!BI", client, 0) + ssl_sub)
    tlvs += _tlv(PP2_TYPE_MESHTLS_SPIFFE_ID, spiffe_id.encode())
    payload = body + tlvs
    return SIGNATURE + struct.pack("!BBH", VERSION_COMMAND_PROXY, family, len(payload)) + payload
