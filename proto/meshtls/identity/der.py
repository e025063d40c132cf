"""Reading DER (X.690) just enough to walk a certificate: the CA's leaf encoder reuses the
fixed parts of a probe certificate, and the X509-SVID profile check reads each leaf's
fields straight from its bytes.

Every reader checks that an element fits inside what encloses it and raises `DerError`
otherwise, so malformed input fails with a message, never an IndexError.
"""

from __future__ import annotations

import calendar
import functools

SEQUENCE = 0x30
SET = 0x31
BOOLEAN = 0x01
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OID = 0x06
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
EXPLICIT_0 = 0xA0  # TBSCertificate.version
EXPLICIT_3 = 0xA3  # TBSCertificate.extensions
SAN_DNS = 0x82  # GeneralName dNSName, [2] IMPLICIT
SAN_URI = 0x86  # uniformResourceIdentifier, [6]
SAN_IP = 0x87  # iPAddress, [7]
KEY_IDENTIFIER = 0x80  # AuthorityKeyIdentifier.keyIdentifier, [0] IMPLICIT

# Object identifiers of an X509-SVID, as the content octets of their OID element.
OID_BASIC_CONSTRAINTS = b"\x55\x1d\x13"
OID_KEY_USAGE = b"\x55\x1d\x0f"
OID_EXTENDED_KEY_USAGE = b"\x55\x1d\x25"
OID_SUBJECT_KEY_IDENTIFIER = b"\x55\x1d\x0e"
OID_AUTHORITY_KEY_IDENTIFIER = b"\x55\x1d\x23"
OID_SUBJECT_ALT_NAME = b"\x55\x1d\x11"
OID_SERVER_AUTH = b"\x2b\x06\x01\x05\x05\x07\x03\x01"
OID_CLIENT_AUTH = b"\x2b\x06\x01\x05\x05\x07\x03\x02"
OID_RSA_ENCRYPTION = b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01"


class DerError(ValueError):
    """The bytes are not the DER this reader expected."""


def read_tlv(der: bytes, offset: int, end: int | None = None) -> tuple[int, int, int]:
    """(tag, start of the value, end of the element) of the DER element at `offset`, which
    must end by `end` (default: the end of `der`)."""
    limit = len(der) if end is None else end
    if offset + 2 > limit:
        raise DerError(f"truncated element at offset {offset}")
    tag = der[offset]
    first = der[offset + 1]
    if first < 0x80:
        start = offset + 2
        element_end = start + first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise DerError(f"unsupported length encoding at offset {offset}")
        start = offset + 2 + count
        element_end = start + int.from_bytes(der[offset + 2 : start], "big")
    if element_end > limit:
        raise DerError(f"element at offset {offset} runs past its container")
    return tag, start, element_end


def children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, value start, element end) of each element between `start` and `end`."""
    out = []
    while start < end:
        found = read_tlv(der, start, end)
        out.append(found)
        start = found[2]
    return out


def elements(der: bytes, start: int, end: int) -> list[bytes]:
    """The DER elements between `start` and `end`, each with its tag and length."""
    out = []
    while start < end:
        _, _, element_end = read_tlv(der, start, end)
        out.append(der[start:element_end])
        start = element_end
    return out


def expect(der: bytes, offset: int, tag: int, end: int | None = None) -> tuple[int, int]:
    """(value start, element end) of the element at `offset`, which must have `tag`."""
    found, start, element_end = read_tlv(der, offset, end)
    if found != tag:
        raise DerError(f"expected tag 0x{tag:02x} at offset {offset}, found 0x{found:02x}")
    return start, element_end


@functools.lru_cache(maxsize=256)
def time_value(tag: int, text: bytes) -> float:
    """UNIX seconds of a UTCTime or GeneralizedTime value in the form RFC 5280 requires
    (YYMMDDHHMMSSZ, or YYYYMMDDHHMMSSZ)."""
    if tag == UTC_TIME and len(text) == 13:
        year = int(text[:2])
        year += 1900 if year >= 50 else 2000
        rest = text[2:12]
    elif tag == GENERALIZED_TIME and len(text) == 15:
        year = int(text[:4])
        rest = text[4:14]
    else:
        raise DerError(f"a time must be UTCTime or GeneralizedTime in UTC, got {text!r}")
    if not text.endswith(b"Z") or not rest.isdigit():
        raise DerError(f"a time must be UTCTime or GeneralizedTime in UTC, got {text!r}")
    month, day, hour, minute, second = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
