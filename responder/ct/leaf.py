"""Parsing of CT log entries: RFC 6962 MerkleTreeLeaf and Static CT data tiles.

The hot path is written around offsets into the fetched buffer: framing is
walked once, other CAs' entries are skipped by a byte compare (the 32-byte
``issuer_key_hash`` of a precert, the issuer Name of an x509 entry), and only
our own issuers' entries have their serial read by :mod:`signer.der`.

Issuer identity is the SHA-256 of the issuer's whole SubjectPublicKeyInfo
(CT's ``issuer_key_hash``):

* precert entries carry it, but a log (or whoever submitted to it) can write
  any 32 bytes there. An entry naming one of our key hashes is ours only if
  its precertificate (tile ``pre_certificate`` / get-entries ``extra_data``)
  is signed by that issuer's key, or by a Precertificate Signing Certificate
  (RFC 6962 3.1: first chain element, CT precert-signing EKU) that our key
  signed; and the precertificate carries the logged TBS's serial and notAfter.
  Anything else is a :class:`SuspiciousEntry`: counted, never indexed.
  Entries naming another key hash are skipped without any verification;
* x509 entries: the certificate's issuer Name must byte-equal a configured
  issuer's subject (cheap skip), and then the configured issuer's key must
  verify the certificate's signature. A Name match alone is not enough: a
  re-keyed CA or an impostor may share the Name. Cross-signed copies of an
  issuer share its key, hence its identity.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PSS, PKCS1v15
from cryptography.hazmat.primitives.serialization import Encoding

from signer import der
from signer.der import DERError

from .errors import MalformedEntryError, MalformedTileError

log = logging.getLogger(__name__)

EntryKind = Literal["x509", "precert"]
X509_ENTRY = 0
PRECERT_ENTRY = 1
EXT_LEAF_INDEX = 0
#: RFC 6962 3.1 Precertificate Signing Certificate EKU
PRECERT_SIGNING_EKU = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.4")
NOT_SIGNED_BY_ISSUER = "precertificate not signed by the named issuer's key"
_KINDS: dict[int, EntryKind] = {X509_ENTRY: "x509", PRECERT_ENTRY: "precert"}
# 0x00 leaf-hash domain separator, MerkleTreeLeaf version v1 (0), leaf_type timestamped_entry (0)
_LEAF_PREFIX = b"\x00\x00\x00"
_sha256 = hashlib.sha256


@dataclass(frozen=True, slots=True)
class IndexedEntry:
    """One of our issuers' certificates or precertificates, as found in a log."""

    leaf_index: int
    timestamp_ms: int
    kind: EntryKind
    serial: int
    issuer_key_hash: bytes  # SHA-256 of the issuer's DER SubjectPublicKeyInfo
    #: the certificate's notAfter, POSIX seconds (None: its Validity did not parse)
    not_after: int | None = None
    #: set when the log's TBSCertificate disagrees with the precertificate our key
    #: signed: serial and notAfter are then the precertificate's (what we vouched for)
    mismatch: str | None = None


@dataclass(frozen=True, slots=True)
class SuspiciousEntry:
    """An entry naming our issuer_key_hash that our issuer did not sign; never indexed.

    ``want_issuer``: a Static CT tile names its chain by fingerprint only; when the
    precertificate may come from a Precertificate Signing Certificate, this is the
    first chain fingerprint: the follower fetches that certificate and asks again.
    """

    leaf_index: int
    reason: str
    issuer_key_hash: bytes
    want_issuer: bytes | None = None


@dataclass(frozen=True, slots=True)
class MalformedEntry:
    """An entry that could be ours but could not be parsed; reported, never indexed."""

    leaf_index: int
    reason: str
    issuer_key_hash: bytes | None  # known for precerts, None if unknown


class RawEntry(NamedTuple):
    """Framing of one TimestampedEntry: offsets into the buffer it was read from."""

    timestamp_ms: int
    entry_type: int  # 0 x509_entry, 1 precert_entry
    te_start: int  # TimestampedEntry [te_start, te_end)
    te_end: int
    body_start: int  # x509: the certificate; precert: the TBSCertificate
    body_end: int
    leaf_index: int | None  # from the static-ct-api leaf_index extension, if present


def _u(buf: bytes, pos: int, n: int, end: int) -> int:
    if pos + n > end:
        raise MalformedEntryError("truncated length field")
    return int.from_bytes(buf[pos : pos + n], "big")


def parse_timestamped_entry(buf: bytes, pos: int, end: int) -> RawEntry:
    """Parse the RFC 6962 TimestampedEntry starting at ``pos``; it may end before ``end``."""
    start = pos
    if pos + 10 > end:
        raise MalformedEntryError("truncated TimestampedEntry")
    ts = int.from_bytes(buf[pos : pos + 8], "big")
    etype = (buf[pos + 8] << 8) | buf[pos + 9]
    pos += 10
    if etype == X509_ENTRY:
        n = _u(buf, pos, 3, end)
        b0 = pos + 3
    elif etype == PRECERT_ENTRY:
        n = _u(buf, pos + 32, 3, end)
        b0 = pos + 35
    else:
        raise MalformedEntryError(f"unknown entry_type {etype}")
    b1 = b0 + n
    if n == 0 or b1 > end:
        raise MalformedEntryError("signed entry empty or truncated")
    elen = _u(buf, b1, 2, end)
    e0 = b1 + 2
    e1 = e0 + elen
    if e1 > end:
        raise MalformedEntryError("extensions truncated")
    index = _leaf_index_extension(buf, e0, e1) if elen else None
    return RawEntry(ts, etype, start, e1, b0, b1, index)


def _leaf_index_extension(buf: bytes, pos: int, end: int) -> int | None:
    """Return the leaf_index extension (uint40) from CtExtensions, if present."""
    index: int | None = None
    seen: set[int] = set()
    while pos < end:
        if pos + 3 > end:
            raise MalformedEntryError("truncated extension header")
        etype = buf[pos]
        n = (buf[pos + 1] << 8) | buf[pos + 2]
        pos += 3
        if pos + n > end:
            raise MalformedEntryError("truncated extension data")
        if etype in seen:
            raise MalformedEntryError("duplicate extension")
        seen.add(etype)
        if etype == EXT_LEAF_INDEX:
            if n != 5:
                raise MalformedEntryError("leaf_index extension must be 5 bytes")
            index = int.from_bytes(buf[pos : pos + 5], "big")
        pos += n
    return index


def leaf_hash_of(buf: bytes, raw: RawEntry) -> bytes:
    """Merkle leaf hash: SHA-256(0x00 || MerkleTreeLeaf(v1, timestamped_entry, TE))."""
    return _sha256(_LEAF_PREFIX + buf[raw.te_start : raw.te_end]).digest()


def iter_tile_entries(tile: bytes, count: int, *, exact: bool) -> Iterator[RawEntry]:
    """Walk the first ``count`` TileLeaf structures of a Static CT data tile.

    ``exact`` demands the tile hold exactly ``count`` entries (a partial tile of
    that width); otherwise trailing entries are ignored (a full tile fetched in
    place of a vanished partial one). Broken framing raises MalformedTileError,
    since no later entry can be located.
    """
    pos = 0
    end = len(tile)
    for i in range(count):
        try:
            raw = parse_timestamped_entry(tile, pos, end)
            pos = raw.te_end
            if raw.entry_type == PRECERT_ENTRY:
                pos += 3 + _u(tile, pos, 3, end)
            n = _u(tile, pos, 2, end)
            pos += 2 + n
            if pos > end or n % 32:
                raise MalformedEntryError("bad certificate_chain")
        except MalformedEntryError as exc:
            raise MalformedTileError(f"data tile entry {i}: {exc}") from exc
        yield raw
    if exact and pos != end:
        raise MalformedTileError(f"data tile has bytes beyond its {count} entries")


def parse_merkle_tree_leaf(leaf_input: bytes) -> RawEntry:
    """Parse an RFC 6962 ``leaf_input`` (MerkleTreeLeaf); offsets are into leaf_input."""
    if len(leaf_input) < 2 or leaf_input[0] != 0 or leaf_input[1] != 0:
        raise MalformedEntryError("not a v1 timestamped_entry MerkleTreeLeaf")
    raw = parse_timestamped_entry(leaf_input, 2, len(leaf_input))
    if raw.te_end != len(leaf_input):
        raise MalformedEntryError("trailing bytes after MerkleTreeLeaf")
    return raw


def parse_asn1_cert_list(buf: bytes, pos: int, end: int) -> list[bytes]:
    """Parse ``ASN.1Cert list<0..2^24-1>`` (3-byte lengths) that must fill [pos, end)."""
    n = _u(buf, pos, 3, end)
    pos += 3
    if pos + n != end:
        raise MalformedEntryError("certificate list length mismatch")
    out: list[bytes] = []
    while pos < end:
        c = _u(buf, pos, 3, end)
        pos += 3
        if c == 0 or pos + c > end:
            raise MalformedEntryError("bad ASN.1Cert length")
        out.append(buf[pos : pos + c])
        pos += c
    return out


def parse_extra_data(extra_data: bytes, entry_type: int) -> tuple[bytes | None, list[bytes]]:
    """Parse get-entries ``extra_data``: (pre_certificate or None, issuer chain DERs)."""
    end = len(extra_data)
    if entry_type == X509_ENTRY:
        return None, parse_asn1_cert_list(extra_data, 0, end)
    n = _u(extra_data, 0, 3, end)
    if n == 0 or 3 + n > end:
        raise MalformedEntryError("bad pre_certificate length")
    return extra_data[3 : 3 + n], parse_asn1_cert_list(extra_data, 3 + n, end)


# --- issuers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issuer:
    """A configured issuing CA: what we match entries against."""

    key_hash: bytes  # SHA-256 of DER SubjectPublicKeyInfo == CT issuer_key_hash
    subject_der: bytes
    spki_der: bytes
    certificate: x509.Certificate

    @classmethod
    def from_certificate(cls, cert: x509.Certificate | bytes) -> Issuer:
        """Build from a certificate (object, DER or PEM); SPKI/subject bytes as encoded."""
        if isinstance(cert, bytes):
            cert = (
                x509.load_pem_x509_certificate(cert)
                if cert.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(cert)
            )
        raw = cert.public_bytes(Encoding.DER)
        f = der.certificate_fields(raw)
        spki = raw[f.spki[0] : f.spki[1]]
        return cls(
            key_hash=_sha256(spki).digest(),
            subject_der=raw[f.subject[0] : f.subject[1]],
            spki_der=spki,
            certificate=cert,
        )


class IssuerSet:
    """Our issuers, indexed for the two cheap pre-filters (key hash, subject Name)."""

    def __init__(self, issuers: Iterable[Issuer | x509.Certificate | bytes]) -> None:
        self.by_key_hash: dict[bytes, Issuer] = {}
        self.by_subject: dict[bytes, list[Issuer]] = {}
        self._keys: dict[bytes, object] = {}
        for item in issuers:
            iss = item if isinstance(item, Issuer) else Issuer.from_certificate(item)
            # A cross-signed copy has the same key, hence the same identity.
            self.by_key_hash.setdefault(iss.key_hash, iss)
            self._keys.setdefault(iss.key_hash, iss.certificate.public_key())
            cands = self.by_subject.setdefault(iss.subject_der, [])
            if all(c.key_hash != iss.key_hash for c in cands):
                cands.append(iss)

    def __len__(self) -> int:
        return len(self.by_key_hash)

    def x509_issuer(self, cert_der: bytes, issuer_name: bytes) -> bytes | None:
        """Key hash of the configured issuer whose key signed ``cert_der``, else None."""
        cands = self.by_subject.get(issuer_name)
        if not cands:
            return None
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError as exc:
            raise MalformedEntryError(f"certificate does not load: {exc}") from exc
        for iss in cands:
            if _signed_by(cert, self._keys[iss.key_hash]):
                return iss.key_hash
        log.warning("x509 entry names a configured issuer but no configured key signed it")
        return None

    def precert_problem(
        self, key_hash: bytes, pre: x509.Certificate, chain_first: bytes | None
    ) -> str | None:
        """Why this precertificate is not our issuer's (None: it is).

        Ours: signed by the issuer of ``key_hash`` directly, or by ``chain_first``,
        a Precertificate Signing Certificate (CT EKU) that issuer's key signed.
        """
        pub = self._keys[key_hash]
        if not _signed_by(pre, pub):
            if chain_first is None:
                return NOT_SIGNED_BY_ISSUER
            try:
                psc = x509.load_der_x509_certificate(chain_first)
                eku = psc.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except (ValueError, x509.ExtensionNotFound):
                return "precertificate not signed by the named issuer (no signing CA)"
            if PRECERT_SIGNING_EKU not in eku:
                return "precertificate not signed by the named issuer (chain[0] lacks CT EKU)"
            if not _signed_by(psc, pub):
                return "precertificate signing CA not signed by the named issuer's key"
            if not _signed_by(pre, psc.public_key()):
                return "precertificate not signed by the named issuer or its signing CA"
        return None


def _not_after_seconds(cert: x509.Certificate) -> int | None:
    """notAfter as POSIX seconds, None where cryptography cannot represent it."""
    try:
        return int(cert.not_valid_after_utc.timestamp())
    except (ValueError, OverflowError):
        return None


def _signed_by(cert: x509.Certificate, pub: object) -> bool:
    """True iff ``pub`` verifies ``cert``'s signature (any hash, SHA-1 included).

    Not a validity check: it only establishes which key issued the certificate,
    so legacy SHA-1 certificates of our own CA are still recognised.
    """
    sig, tbs = cert.signature, cert.tbs_certificate_bytes
    try:
        params = cert.signature_algorithm_parameters
        algo = cert.signature_hash_algorithm
        if isinstance(pub, rsa.RSAPublicKey) and isinstance(params, (PKCS1v15, PSS)):
            assert algo is not None
            pub.verify(sig, tbs, params, algo)
        elif isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            pub.verify(sig, tbs, params)
        elif isinstance(pub, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            pub.verify(sig, tbs)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError, AssertionError):
        return False
    return True


def tile_precert_tail(tile: bytes, raw: RawEntry) -> tuple[bytes, list[bytes]]:
    """A Static CT precert TileLeaf's pre_certificate and chain fingerprints.

    Framing was checked by :func:`iter_tile_entries`; only our entries get here.
    """
    pos = raw.te_end
    n = _u(tile, pos, 3, len(tile))
    pre = tile[pos + 3 : pos + 3 + n]
    pos += 3 + n
    m = _u(tile, pos, 2, len(tile))
    fps = tile[pos + 2 : pos + 2 + m]
    return pre, [fps[i : i + 32] for i in range(0, len(fps), 32)]


def extract(
    buf: bytes,
    raw: RawEntry,
    leaf_index: int,
    issuers: IssuerSet,
    extra_data: bytes | None = None,
    chain_first: bytes | None = None,
) -> IndexedEntry | MalformedEntry | SuspiciousEntry | None:
    """Our IndexedEntry for ``raw``, None for another CA's entry, or a Malformed/SuspiciousEntry.

    ``extra_data``: an RFC 6962 entry's get-entries extra_data; None means ``buf``
    is a Static CT data tile holding the TileLeaf's pre_certificate and chain.
    ``chain_first``: for a tile, the certificate behind the first chain fingerprint,
    once fetched on a SuspiciousEntry's ``want_issuer``.
    Never raises for a bad certificate: a follower must not stop on one entry.
    """
    if raw.entry_type == PRECERT_ENTRY:
        ikh = buf[raw.body_start - 35 : raw.body_start - 3]
        if ikh not in issuers.by_key_hash:
            return None
        try:
            serial, not_after = der.tbs_serial_and_not_after(buf, raw.body_start, raw.body_end)
        except DERError as exc:
            return MalformedEntry(leaf_index, f"precert TBSCertificate: {exc}", ikh)
        want: bytes | None = None
        try:
            if extra_data is None:
                pre, fps = tile_precert_tail(buf, raw)
                want = fps[0] if fps and chain_first is None else None
            else:
                logged, chain = parse_extra_data(extra_data, PRECERT_ENTRY)
                assert logged is not None  # always present for a precert entry
                pre, chain_first = logged, (chain[0] if chain else None)
        except MalformedEntryError as exc:
            return MalformedEntry(leaf_index, f"precert chain data: {exc}", ikh)
        try:
            pre_cert = x509.load_der_x509_certificate(pre)
        except ValueError as exc:
            return SuspiciousEntry(leaf_index, f"precertificate does not load: {exc}", ikh)
        problem = issuers.precert_problem(ikh, pre_cert, chain_first)
        if problem is not None:
            if problem != NOT_SIGNED_BY_ISSUER:
                want = None
            return SuspiciousEntry(leaf_index, problem, ikh, want)
        # Our key signed this precertificate, so its serial was issued (BR 7.1.2.9: a
        # precertificate implies the certificate), whatever the log's TBSCertificate
        # says. Only serial and notAfter are indexed, so only they are compared (a full
        # TBS comparison would cost a DER rebuild). On a mismatch the precertificate's
        # values are indexed, never the log's: a log cannot make us vouch for a serial.
        signed_not_after = _not_after_seconds(pre_cert)
        if pre_cert.serial_number != serial or (
            not_after is not None and signed_not_after != not_after
        ):
            what = "serial" if pre_cert.serial_number != serial else "notAfter"
            return IndexedEntry(
                leaf_index,
                raw.timestamp_ms,
                "precert",
                pre_cert.serial_number,
                ikh,
                signed_not_after,
                mismatch=f"the logged TBSCertificate's {what} differs from the precertificate's",
            )
        return IndexedEntry(leaf_index, raw.timestamp_ms, "precert", serial, ikh, not_after)
    try:
        serial, i0, i1 = der.certificate_serial_and_issuer(buf, raw.body_start, raw.body_end)
        if buf[i0:i1] not in issuers.by_subject:
            return None
        key_hash = issuers.x509_issuer(buf[raw.body_start : raw.body_end], buf[i0:i1])
    except (DERError, MalformedEntryError) as exc:
        return MalformedEntry(leaf_index, f"x509 certificate: {exc}", None)
    if key_hash is None:
        return None
    # only for our certificates: another CA's Validity is never decoded
    not_after = der.certificate_not_after(buf, raw.body_start, raw.body_end)
    return IndexedEntry(leaf_index, raw.timestamp_ms, "x509", serial, key_hash, not_after)
