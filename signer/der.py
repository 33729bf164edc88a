"""A minimal, strict DER reader for the few fields cryptography does not expose raw.

We need the exact bytes of a certificate's SubjectPublicKeyInfo and of its subject Name
(OCSP CertIDs and CT issuer_key_hash are hashes of those bytes as encoded, not as
re-encoded by a library), so we walk the TBSCertificate ourselves. Only definite-length
DER is accepted; anything else raises DERError.
"""

from __future__ import annotations

from typing import NamedTuple


class DERError(ValueError):
    """The bytes are not the DER structure we expected."""


class TLV(NamedTuple):
    tag: int
    start: int  # offset of the tag byte
    value_start: int
    end: int  # offset one past the value


def read_tlv(data: bytes, offset: int = 0, limit: int | None = None) -> TLV:
    """Read one TLV at ``offset``; single-byte tags and definite lengths only."""
    end_limit = len(data) if limit is None else limit
    if offset + 2 > end_limit:
        raise DERError("truncated TLV header")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DERError("multi-byte tags are not used in these structures")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise DERError("indefinite or oversized length")
        if pos + count > end_limit:
            raise DERError("truncated length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if data[pos] == 0 or length < 0x80:
            raise DERError("non-minimal length encoding")
        pos += count
    if pos + length > end_limit:
        raise DERError("value runs past the end of its container")
    return TLV(tag, offset, pos, pos + length)


def children(data: bytes, container: TLV) -> list[TLV]:
    """The TLVs directly inside a constructed TLV."""
    out: list[TLV] = []
    pos = container.value_start
    while pos < container.end:
        tlv = read_tlv(data, pos, container.end)
        out.append(tlv)
        pos = tlv.end
    return out


class TBSFields(NamedTuple):
    serial_value: bytes  # INTEGER contents (two's complement, as encoded)
    issuer_der: bytes
    subject_der: bytes
    spki_der: bytes


def tbs_fields(tbs: bytes) -> TBSFields:
    """Split a TBSCertificate into the raw fields OCSP and CT hash."""
    outer = read_tlv(tbs)
    if outer.tag != 0x30 or outer.end != len(tbs):
        raise DERError("TBSCertificate is not one SEQUENCE")
    fields = children(tbs, outer)
    if fields and fields[0].tag == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    if len(fields) < 6 or fields[0].tag != 0x02:
        raise DERError("TBSCertificate lacks serial/issuer/validity/subject/SPKI")
    serial, _sig_alg, issuer, _validity, subject, spki = fields[:6]
    return TBSFields(
        serial_value=tbs[serial.value_start : serial.end],
        issuer_der=tbs[issuer.start : issuer.end],
        subject_der=tbs[subject.start : subject.end],
        spki_der=tbs[spki.start : spki.end],
    )


def spki_key_bits(spki_der: bytes) -> bytes:
    """The subjectPublicKey BIT STRING value (without the unused-bits byte): what OCSP hashes."""
    outer = read_tlv(spki_der)
    parts = children(spki_der, outer)
    if len(parts) != 2 or parts[1].tag != 0x03:
        raise DERError("SubjectPublicKeyInfo is not SEQUENCE { AlgorithmIdentifier, BIT STRING }")
    bits = parts[1]
    if bits.end - bits.value_start < 1 or spki_der[bits.value_start] != 0:
        raise DERError("subjectPublicKey has unused bits")
    return spki_der[bits.value_start + 1 : bits.end]
