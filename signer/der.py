"""The one minimal, strict DER walker of the project (signer and CT index share it).

We need the exact bytes of a certificate's SubjectPublicKeyInfo and Names (OCSP CertIDs
and CT's issuer_key_hash hash those bytes as encoded, not as re-encoded by a library),
``cryptography`` cannot load a bare TBSCertificate (what a CT precert entry carries), and
loading every certificate of a busy log would be far too slow. So we walk the TLVs
ourselves, by offsets into the buffer (no copies on the CT hot path). The walk is strict:
definite, minimal lengths that stay inside their parent, single-byte tags, and minimally
encoded INTEGER serials. Every defect raises :class:`DERError`, never IndexError.
"""

from __future__ import annotations

import calendar
from typing import NamedTuple


class DERError(ValueError):
    """The bytes are not the strict DER structure we expected."""


TAG_INTEGER = 0x02
TAG_SEQUENCE = 0x30
TAG_VERSION = 0xA0  # [0] EXPLICIT Version in TBSCertificate
TAG_UTC_TIME = 0x17
TAG_GENERALIZED_TIME = 0x18


def read_tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Read one TLV at ``pos`` bounded by ``end``; return (tag, content_start, content_end)."""
    if pos + 2 > end:
        raise DERError("truncated TLV header")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise DERError("multi-byte tags are not expected here")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0:
            raise DERError("indefinite length is not DER")
        if n > 4 or pos + n > end:
            raise DERError("length field too long or truncated")
        length = int.from_bytes(buf[pos : pos + n], "big")
        if buf[pos] == 0 or length < 0x80:
            raise DERError("non-minimal length encoding")
        pos += n
    if pos + length > end:
        raise DERError("TLV runs past its enclosing element")
    return tag, pos, pos + length


def expect(buf: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    """Read a TLV that must carry ``tag``; return its (content_start, content_end)."""
    got, start, stop = read_tlv(buf, pos, end)
    if got != tag:
        raise DERError(f"expected tag 0x{tag:02x}, found 0x{got:02x}")
    return start, stop


def decode_integer(buf: bytes, start: int, end: int) -> int:
    """Decode a minimally encoded two's-complement INTEGER content."""
    if end <= start:
        raise DERError("empty INTEGER")
    if end - start > 1:
        a, b = buf[start], buf[start + 1]
        if (a == 0 and b < 0x80) or (a == 0xFF and b >= 0x80):
            raise DERError("non-minimal INTEGER encoding")
    return int.from_bytes(buf[start:end], "big", signed=True)


class TBSFields(NamedTuple):
    """Offsets (into the buffer walked) of the TBSCertificate fields we use."""

    serial: int
    issuer: tuple[int, int]  # whole issuer Name TLV [start, end)
    subject: tuple[int, int]  # whole subject Name TLV
    spki: tuple[int, int]  # whole SubjectPublicKeyInfo TLV


def _serial_and_issuer(buf: bytes, start: int, end: int) -> tuple[int, int, int]:
    """Inside TBSCertificate content: return (serial, issuer_start, issuer_end)."""
    pos = start
    tag, _, stop = read_tlv(buf, pos, end)
    if tag == TAG_VERSION:
        pos = stop
    s0, s1 = expect(buf, pos, end, TAG_INTEGER)
    serial = decode_integer(buf, s0, s1)
    _, _, pos = read_tlv(buf, s1, end)  # signature AlgorithmIdentifier
    _, i1 = expect(buf, pos, end, TAG_SEQUENCE)  # issuer Name
    return serial, pos, i1


def _tbs_fields_in(buf: bytes, start: int, end: int) -> TBSFields:
    serial, i0, i1 = _serial_and_issuer(buf, start, end)
    _, v1 = expect(buf, i1, end, TAG_SEQUENCE)  # validity
    _, sub1 = expect(buf, v1, end, TAG_SEQUENCE)  # subject Name
    _, k1 = expect(buf, sub1, end, TAG_SEQUENCE)  # subjectPublicKeyInfo
    return TBSFields(serial, (i0, i1), (v1, sub1), (sub1, k1))


#: (year, month) -> (POSIX seconds at its first midnight, days in it): the CT index decodes
#: a notAfter per logged entry, and most fall in a handful of months
_MONTHS: dict[tuple[int, int], tuple[int, int]] = {}


def decode_time(buf: bytes, tag: int, start: int, end: int) -> int:
    """An RFC 5280 (4.1.2.5) Time as POSIX seconds: UTCTime ``YYMMDDHHMMSSZ`` (YY >= 50
    is 19YY) or GeneralizedTime ``YYYYMMDDHHMMSSZ``; any other form is a DERError."""
    length = end - start
    if tag == TAG_UTC_TIME and length == 13:
        digits = 2
    elif tag == TAG_GENERALIZED_TIME and length == 15:
        digits = 4
    else:
        raise DERError(f"not an RFC 5280 Time (tag 0x{tag:02x}, {length} bytes)")
    # isdigit first: int() alone would take " 1", "+1" or "1_0"
    if buf[end - 1] != 0x5A or not buf[start : end - 1].isdigit():
        raise DERError("Time is not digits ending in Z")
    year = int(buf[start : start + digits])
    if digits == 2:
        year += 1900 if year >= 50 else 2000
    elif year < 1950:  # RFC 5280: UTCTime until 2049; and no year 0 for the calendar
        raise DERError("GeneralizedTime before 1950")
    rest = int(buf[start + digits : end - 1])  # MMDDHHMMSS
    month, day = rest // 100_000_000, rest // 1_000_000 % 100
    hour, minute, second = rest // 10_000 % 100, rest // 100 % 100, rest % 100
    if not 1 <= month <= 12:
        raise DERError("Time has no such month")
    known = _MONTHS.get((year, month))
    if known is None:
        known = (calendar.timegm((year, month, 1, 0, 0, 0)), calendar.monthrange(year, month)[1])
        if year < 2200:  # bounded: years far out come from odd certificates, rarely
            _MONTHS[(year, month)] = known
    if not 1 <= day <= known[1] or hour > 23 or minute > 59 or second > 59:
        raise DERError("Time has no such day or time of day")
    return known[0] + (day - 1) * 86_400 + hour * 3_600 + minute * 60 + second


def _not_after(buf: bytes, pos: int, end: int) -> int:
    """notAfter (POSIX seconds) of the Validity SEQUENCE at ``pos``."""
    v0, v1 = expect(buf, pos, end, TAG_SEQUENCE)
    _, _, after_start = read_tlv(buf, v0, v1)  # notBefore
    tag, t0, t1 = read_tlv(buf, after_start, v1)
    if t1 != v1:
        raise DERError("Validity has more than two Times")
    return decode_time(buf, tag, t0, t1)


def _not_after_or_none(buf: bytes, validity: int, end: int) -> int | None:
    """notAfter of the Validity at ``validity`` (TBSCertificate content ends at ``end``);
    None when it does not parse: the serial still counts (an issued serial is never
    dropped for a defect elsewhere in its certificate)."""
    try:
        return _not_after(buf, validity, end)
    except DERError:
        return None


def _tbs_content(tbs: bytes, start: int, end: int | None) -> tuple[int, int]:
    """The content [start, end) of a DER TBSCertificate occupying exactly tbs[start:end]."""
    end = len(tbs) if end is None else end
    c0, c1 = expect(tbs, start, end, TAG_SEQUENCE)
    if c1 != end:
        raise DERError("trailing bytes after TBSCertificate")
    return c0, c1


def _certificate_tbs_content(cert: bytes, start: int, end: int | None) -> tuple[int, int]:
    """The content [start, end) of the TBSCertificate of a DER Certificate at
    cert[start:end]."""
    t0, t1 = certificate_tbs(cert, start, end)
    return expect(cert, t0, t1, TAG_SEQUENCE)


def tbs_serial_and_not_after(
    tbs: bytes, start: int = 0, end: int | None = None
) -> tuple[int, int | None]:
    """Serial and notAfter (POSIX seconds, or None: ``_not_after_or_none``) of a DER
    TBSCertificate occupying exactly ``tbs[start:end]``."""
    c0, c1 = _tbs_content(tbs, start, end)
    serial, _, validity = _serial_and_issuer(tbs, c0, c1)
    return serial, _not_after_or_none(tbs, validity, c1)


def certificate_serial_and_issuer(
    cert: bytes, start: int = 0, end: int | None = None
) -> tuple[int, int, int]:
    """(serial, issuer_start, issuer_end) of a DER Certificate at ``cert[start:end]``."""
    return _serial_and_issuer(cert, *_certificate_tbs_content(cert, start, end))


def certificate_not_after(cert: bytes, start: int = 0, end: int | None = None) -> int | None:
    """notAfter (POSIX seconds, or None: ``_not_after_or_none``) of a DER Certificate at
    ``cert[start:end]``."""
    try:
        c0, c1 = _certificate_tbs_content(cert, start, end)
        validity = _serial_and_issuer(cert, c0, c1)[2]
    except DERError:
        return None
    return _not_after_or_none(cert, validity, c1)


def tbs_fields(tbs: bytes, start: int = 0, end: int | None = None) -> TBSFields:
    """Walk a DER TBSCertificate occupying exactly ``tbs[start:end]``."""
    return _tbs_fields_in(tbs, *_tbs_content(tbs, start, end))


def certificate_tbs(cert: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Return the [start, end) of the TBSCertificate TLV inside a Certificate."""
    end = len(cert) if end is None else end
    c0, c1 = expect(cert, start, end, TAG_SEQUENCE)
    if c1 != end:
        raise DERError("trailing bytes after Certificate")
    _, t1 = expect(cert, c0, c1, TAG_SEQUENCE)
    return c0, t1


def certificate_fields(cert: bytes, start: int = 0, end: int | None = None) -> TBSFields:
    """Walk a DER Certificate occupying exactly ``cert[start:end]``."""
    return _tbs_fields_in(cert, *_certificate_tbs_content(cert, start, end))


def children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The TLVs inside content ``[start, end)``: (tag, tlv_start, content_start, content_end)."""
    out: list[tuple[int, int, int, int]] = []
    pos = start
    while pos < end:
        tag, c0, c1 = read_tlv(buf, pos, end)
        out.append((tag, pos, c0, c1))
        pos = c1
    return out


def spki_key_bits(spki_der: bytes) -> bytes:
    """The subjectPublicKey BIT STRING value (without the unused-bits byte): what OCSP hashes."""
    c0, c1 = expect(spki_der, 0, len(spki_der), TAG_SEQUENCE)
    if c1 != len(spki_der):
        raise DERError("trailing bytes after SubjectPublicKeyInfo")
    parts = children(spki_der, c0, c1)
    if len(parts) != 2 or parts[1][0] != 0x03:
        raise DERError("SubjectPublicKeyInfo is not SEQUENCE { AlgorithmIdentifier, BIT STRING }")
    _, _, b0, b1 = parts[1]
    if b1 - b0 < 1 or spki_der[b0] != 0:
        raise DERError("subjectPublicKey has unused bits")
    return spki_der[b0 + 1 : b1]


class TLV(NamedTuple):
    """One element located in a buffer, for code that edits DER structures in place."""

    tag: int
    start: int  # offset of the tag byte
    value_start: int
    end: int  # one past the value


def read_element(buf: bytes, pos: int = 0, end: int | None = None) -> TLV:
    """Like :func:`read_tlv`, returning the element's own start too."""
    tag, c0, c1 = read_tlv(buf, pos, len(buf) if end is None else end)
    return TLV(tag, pos, c0, c1)


def element_children(buf: bytes, parent: TLV) -> list[TLV]:
    """The elements directly inside a constructed element."""
    return [TLV(*child) for child in children(buf, parent.value_start, parent.end)]


TAG_OID = 0x06
TAG_EXTENSIONS = 0xA3  # [3] EXPLICIT Extensions in TBSCertificate
#: The optional TBSCertificate fields after subjectPublicKeyInfo, in their order:
#: issuerUniqueID [1] IMPLICIT, subjectUniqueID [2] IMPLICIT (BIT STRINGs, primitive in
#: DER), extensions [3] EXPLICIT.
_TBS_TRAILING_TAGS = (0x81, 0x82, TAG_EXTENSIONS)
_TBS_FIXED_TAGS = (TAG_INTEGER, *(TAG_SEQUENCE,) * 5)
#: The extnID contents (RFC 6962 3.1 and 3.3) of the CT precertificate poison
#: (1.3.6.1.4.1.11129.2.4.3) and the embedded SCT list (1.3.6.1.4.1.11129.2.4.2): the
#: only extensions by which a precertificate's TBSCertificate and its final
#: certificate's may differ.
OID_CT_POISON = bytes.fromhex("2b06010401d679020403")
OID_CT_SCT_LIST = bytes.fromhex("2b06010401d679020402")
CT_EXTENSION_OIDS = frozenset({OID_CT_POISON, OID_CT_SCT_LIST})


def encode_tlv(tag: int, content: bytes) -> bytes:
    """One DER TLV with a minimal (definite) length."""
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(body))) + body + content


def tbs_without_ct_extensions(tbs: bytes) -> bytes:
    """The DER TBSCertificate ``tbs`` with the CT poison and SCT list extensions removed,
    re-encoded with minimal lengths (an Extensions left empty is dropped: RFC 5280 allows
    no empty one). Equal for a precertificate and its final certificate (RFC 6962 3.1:
    the same TBSCertificate but for those two; extension order kept) and different for
    any two other certificates. Strict: every field is walked, any defect is DERError."""
    c0, c1 = _tbs_content(tbs, 0, None)
    parts = children(tbs, c0, c1)
    fixed = 7 if parts and parts[0][0] == TAG_VERSION else 6
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if tuple(part[0] for part in parts[fixed - 6 : fixed]) != _TBS_FIXED_TAGS:
        raise DERError("not a TBSCertificate: unexpected fields")
    out = bytearray(tbs[c0 : parts[fixed - 1][3]])
    last = -1
    for tag, start, v0, v1 in parts[fixed:]:
        order = _TBS_TRAILING_TAGS.index(tag) if tag in _TBS_TRAILING_TAGS else -1
        if order <= last:
            raise DERError(f"unexpected field 0x{tag:02x} after subjectPublicKeyInfo")
        last = order
        if tag != TAG_EXTENSIONS:
            out += tbs[start:v1]
            continue
        e0, e1 = expect(tbs, v0, v1, TAG_SEQUENCE)
        if e1 != v1:
            raise DERError("trailing bytes after Extensions")
        kept = bytearray()
        for etag, es, ev0, ev1 in children(tbs, e0, e1):
            if etag != TAG_SEQUENCE:
                raise DERError("an Extension is not a SEQUENCE")
            o0, o1 = expect(tbs, ev0, ev1, TAG_OID)
            if tbs[o0:o1] not in CT_EXTENSION_OIDS:
                kept += tbs[es:ev1]
        if kept:
            out += encode_tlv(TAG_EXTENSIONS, encode_tlv(TAG_SEQUENCE, bytes(kept)))
    return encode_tlv(TAG_SEQUENCE, bytes(out))
