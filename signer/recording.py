"""Recording issuance: a certificate or precertificate becomes a durable signed response.

The CA calls this BEFORE publishing a (pre)certificate. We parse it, find its issuer by
name and signature, sign a "good" response, and commit the certificate record and the
response in one transaction. Only after the commit does the caller hear "recorded"; any
failure is an exception the caller must turn into a refusal, so the CA does not publish.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from responder import metrics
from responder.store import (
    CertificateRecord,
    Collision,
    PresignedStore,
    SerialCollision,
    StoreUnavailable,
)
from signer.der import DERError, read_element, tbs_fields, tbs_without_ct_extensions
from signer.issuers import IssuerRegistry
from signer.presign import PresignedSigner
from signer.response_builder import CertStatus, SignedResponse, SigningError, ValidityPolicy

log = logging.getLogger(__name__)


class CertificateRejected(ValueError):
    """The submitted bytes are not a certificate we can record; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class SerialCollisionRejected(CertificateRejected):
    """Refused, nothing of the call written (409): a serial of the call is already
    recorded, or given earlier in the call, for another certificate of the same issuer.
    ``collisions`` are (position in the prepared records, why) for each one; ``issuer``
    names the issuer of the first."""

    def __init__(self, collisions: list[tuple[int, CertificateRejected]], issuer: str) -> None:
        first = str(collisions[0][1])
        more = f" (and {len(collisions) - 1} more)" if len(collisions) > 1 else ""
        super().__init__(first + more, status=409)
        self.collisions = collisions
        self.issuer = issuer


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """What recording left in the store: ``status`` and the times are those of the stored
    response, which OCSP serves (an earlier one is kept, e.g. a revoked one), not
    necessarily of the response signed for this call."""

    serial: int
    issuer: str
    precertificate: bool
    created: bool
    status: CertStatus
    this_update: int
    next_update: int

    def as_json(self) -> dict[str, object]:
        return {
            "serial": format_serial(self.serial),
            "issuer": self.issuer,
            "precertificate": self.precertificate,
            "created": self.created,
            "status": self.status.name.lower(),
            "this_update": self.this_update,
            "next_update": self.next_update,
        }


def format_serial(serial: int) -> str:
    """Lower-case hex of the serial, even length (as `openssl x509 -serial` prints it)."""
    text = format(serial, "x")
    return text if len(text) % 2 == 0 else "0" + text


#: RFC 5280 4.1.2.2: a serial is a positive INTEGER whose DER content is at most 20
#: octets; with the sign bit that is 1 <= serial <= 2**159 - 1 (at most 40 hex digits,
#: the first of 40 at most 7). Zero and negative serials are refused too.
MAX_SERIAL = 2**159 - 1
SERIAL_RULE = (
    "a serial must be a positive integer of at most 20 octets (RFC 5280 4.1.2.2): "
    "1 to 2^159-1, i.e. at most 40 hex digits"
)
#: how much of a caller's text an error message or log line may quote
QUOTE_LIMIT = 64


class SerialError(ValueError):
    """A serial outside RFC 5280's rule, or not a serial at all (an input error: 4xx)."""


def quote(text: str | bytes, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of caller input, cut to ``limit`` characters: errors and log lines must
    never carry unbounded input."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} in all)"


def check_serial(serial: int) -> int:
    """``serial`` if RFC 5280 allows it, else SerialError naming the rule."""
    if not 1 <= serial <= MAX_SERIAL:
        raise SerialError(f"serial {describe_serial(serial)} refused: {SERIAL_RULE}")
    return serial


def describe_serial(serial: int) -> str:
    """Hex of a serial for messages and logs, bounded (a certificate may carry any)."""
    if serial < 0:
        return "-" + describe_serial(-serial)
    text = format_serial(serial)
    return text if len(text) <= QUOTE_LIMIT else f"{text[:QUOTE_LIMIT]}... ({len(text)} digits)"


_COLON_HEX = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2})*", re.ASCII)


def parse_serial(text: str) -> int:
    """Hex serial, with or without colons or 0x, within RFC 5280's rule; else SerialError."""
    cleaned = text.strip(" \t\r\n").lower().removeprefix("0x")
    if ":" in cleaned:  # openssl's form: octets as two digits each, colon-separated
        if not _COLON_HEX.fullmatch(cleaned):
            raise SerialError(f"serial {quote(text)} is not hex octets separated by colons")
        cleaned = cleaned.replace(":", "")
    if not cleaned or any(c not in "0123456789abcdef" for c in cleaned):
        raise SerialError(f"serial {quote(text)} is not hexadecimal")
    significant = cleaned.lstrip("0")
    if len(significant) > 40:  # too big whatever the digits: no need to convert it
        raise SerialError(f"serial {quote(text)} refused: {SERIAL_RULE}")
    return check_serial(int(cleaned, 16))


class TooManyCertificates(CertificateRejected):
    """A body holds more certificates (DER elements or PEM blocks) than the caller takes:
    found while splitting, so a 16 MiB body of 2-byte SEQUENCEs (8 million elements) is
    refused after ``limit`` of them, not split whole first (seconds of CPU in the event
    loop that also answers OCSP, and hundreds of MB)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"more than {limit} certificates (DER elements or PEM blocks) in one body: "
            f"at most {limit}",
            status=413,
        )


def load_certificates(data: bytes, *, limit: int | None = None) -> list[x509.Certificate]:
    """PEM bundle or DER (one, or several concatenated), strictly: see split_certificates.
    More than ``limit`` certificates: TooManyCertificates (413)."""
    ders = split_certificates(data, limit=limit)
    certs = []
    for index, der in enumerate(ders):
        try:
            certs.append(parse_certificate(der))
        except CertificateRejected as exc:
            if len(ders) == 1:
                raise
            raise CertificateRejected(f"certificate #{index + 1}: {exc}") from exc
    return certs


def split_certificates(data: bytes, *, limit: int | None = None) -> list[bytes]:
    """The DER of each certificate of a PEM bundle or of concatenated DER, not yet parsed.

    The one reader of certificate files and bodies (API, ``issue``, ``import``). Strict,
    so that nothing a caller sent is dropped while the rest is acknowledged: a DER body
    must be whole SEQUENCEs, a PEM body only ``CERTIFICATE`` blocks and whitespace."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (editors add one; openssl skips it)
    if not data.strip():
        raise CertificateRejected("empty body: no certificate found")
    if data[:1] == b"\x30":
        return split_der(data, limit=limit)
    if b"-----BEGIN" not in data:
        raise CertificateRejected(
            "not a PEM or DER certificate: no DER SEQUENCE and no PEM BEGIN line"
        )
    return split_pem(data, limit=limit)


def split_der(data: bytes, *, limit: int | None = None) -> list[bytes]:
    """Concatenated DER SEQUENCEs, split by their lengths (no trailing bytes allowed)."""
    if not data:
        raise CertificateRejected("empty body: no certificate found")
    parts: list[bytes] = []
    pos = 0
    while pos < len(data):
        try:
            tlv = read_element(data, pos)
        except DERError as exc:
            raise CertificateRejected(f"not a PEM or DER certificate: {exc}") from exc
        if tlv.tag != 0x30:
            raise CertificateRejected("not a PEM or DER certificate: expected a SEQUENCE")
        if limit is not None and len(parts) == limit:
            raise TooManyCertificates(limit)
        parts.append(data[tlv.start : tlv.end])
        pos = tlv.end
    return parts


_BOUNDARY = re.compile(rb"-----(BEGIN|END) (.*)-----")
_PEM_LABEL = b"CERTIFICATE"
_WHITESPACE = b" \t\r\n\v\f"


class _Line(NamedTuple):
    start: int  # offset of the line
    end: int  # offset past its newline
    text: bytes  # the line, stripped


def _boundary_lines(data: bytes) -> Iterator[_Line]:
    """Every line that contains "-----" (base64 never does): found with bytes.find, so a
    body of many lines costs no Python per line."""
    at = data.find(b"-----")
    while at != -1:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        end = len(data) if end == -1 else end + 1
        yield _Line(start, end, data[start:end].strip())
        at = data.find(b"-----", end)


def split_pem(data: bytes, *, limit: int | None = None) -> list[bytes]:
    """The DER of each block of a PEM bundle (RFC 7468), refusing what lax readers skip:
    a block labelled anything but CERTIFICATE (``X509 CERTIFICATE``, ``TRUSTED
    CERTIFICATE``...), a block without its END line, headers or bad base64 inside a
    block, and any non-whitespace text outside blocks.

    Finds boundary lines and checks the spans between them with bytes methods (C speed,
    no Python per line): a batch of up to 16 MiB is read in the event loop."""

    def line_of(offset: int) -> int:  # only for error messages
        return data.count(b"\n", 0, offset) + 1

    def refuse_text_outside(span_start: int, span: bytes) -> None:
        if span.strip():
            at = span_start + len(span) - len(span.lstrip())
            text = data[at : at + QUOTE_LIMIT + 1].split(b"\n")[0].strip()
            raise CertificateRejected(
                f"bad PEM: line {line_of(at)}: text outside a CERTIFICATE block {quote(text)}"
            )

    ders: list[bytes] = []
    pos = 0  # end of the last boundary line
    begin_at: int | None = None  # offset of the open block's BEGIN line
    for match in _boundary_lines(data):
        boundary = _BOUNDARY.fullmatch(match.text)
        if boundary is None:
            raise CertificateRejected(
                f"bad PEM: line {line_of(match.start)}: malformed boundary {quote(match.text)}"
            )
        kind, label = boundary.group(1), boundary.group(2)
        if label != _PEM_LABEL:
            raise CertificateRejected(
                f"bad PEM: line {line_of(match.start)}: a "
                f"{quote(label.decode('latin-1'))} block: only CERTIFICATE blocks are accepted"
            )
        if kind == b"BEGIN":
            if begin_at is not None:
                raise CertificateRejected(
                    f"bad PEM: the block of line {line_of(begin_at)} has no END line "
                    f"(line {line_of(match.start)} begins another)"
                )
            if limit is not None and len(ders) == limit:
                raise TooManyCertificates(limit)
            refuse_text_outside(pos, data[pos : match.start])
            begin_at = match.start
        else:
            if begin_at is None:
                raise CertificateRejected(
                    f"bad PEM: line {line_of(match.start)}: END without BEGIN"
                )
            body = data[pos : match.start].translate(None, _WHITESPACE)
            try:
                der = binascii.a2b_base64(body, strict_mode=True)
            except binascii.Error as exc:
                raise CertificateRejected(
                    f"bad PEM: the block of line {line_of(begin_at)} is not valid base64: {exc}"
                ) from exc
            if not der:
                raise CertificateRejected(
                    f"bad PEM: the block of line {line_of(begin_at)} is empty"
                )
            ders.append(der)
            begin_at = None
        pos = match.end
    if begin_at is not None:
        raise CertificateRejected(
            f"bad PEM: the block of line {line_of(begin_at)} has no END line (truncated?)"
        )
    refuse_text_outside(pos, data[pos:])
    if not ders:
        raise CertificateRejected("no certificate found")
    return ders


def parse_certificate(der: bytes) -> x509.Certificate:
    """One certificate from its DER (one element, no trailing bytes)."""
    try:
        with warnings.catch_warnings():
            # a zero or negative serial: refused by check_serial with a clear message
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertificateRejected(f"not a certificate: {exc}") from exc


def is_precertificate(cert: x509.Certificate) -> bool:
    """A precertificate carries the critical CT poison extension (RFC 6962 3.1)."""
    try:
        cert.extensions.get_extension_for_class(x509.PrecertPoison)
    except x509.ExtensionNotFound:
        return False
    except ValueError as exc:
        raise CertificateRejected(f"certificate extensions are malformed: {exc}") from exc
    return True


@dataclass(frozen=True, slots=True)
class PreparedRecord:
    """A certificate ready to commit: its row and its signed good response."""

    record: CertificateRecord
    signed: SignedResponse
    issuer: str


#: Certificates prepared between two yields to the event loop: recording a big batch
#: must not hold up OCSP answers served by the same process for more than a few ms.
PREPARE_SLICE = 32


class CertificateRecorder:
    """Parse, sign and durably store; the one code path for the API, CLI and bulk import."""

    def __init__(
        self, registry: IssuerRegistry, store: PresignedStore, policy: ValidityPolicy
    ) -> None:
        self.registry = registry
        self.store = store
        self.policy = policy
        self.presigner = PresignedSigner(policy)
        #: prepare in a thread: some issuer signs with a token key (see Issuer.token_signed)
        self._off_loop = any(issuer.token_signed for issuer in registry.issuers)

    def prepare(self, cert: x509.Certificate) -> PreparedRecord:
        """Check the serial, find the issuer (name and signature) and sign the response
        (CPU only, no I/O)."""
        serial = certificate_serial(cert)
        issuer = self.registry.issuer_of(cert)
        if issuer is None:
            raise CertificateRejected(
                f"issuer {describe_issuer(cert)} is not configured here "
                "(or did not sign this certificate)" + self._ca_hint(cert),
                status=422,
            )
        precert = is_precertificate(cert)
        fingerprint = tbs_fingerprint(cert)
        signed = self.presigner.sign_good(issuer, serial)
        record = CertificateRecord(
            issuer_id=issuer.db_id,
            serial=serial,
            not_after=cert.not_valid_after_utc,
            precertificate=precert,
            tbs_sha256=fingerprint,
        )
        return PreparedRecord(record, signed, issuer.name)

    def _ca_hint(self, cert: x509.Certificate) -> str:
        """The end of the 422 message: "add the issuer" is the wrong advice for a CA
        certificate sent by mistake (a chain file, an issuer's own certificate), which a
        CA operator would otherwise be told to configure as an issuer."""
        try:
            tbs = cert.tbs_certificate_bytes
            start, end = tbs_fields(tbs).spki
            own = self.registry.for_spki_sha256(hashlib.sha256(tbs[start:end]).digest())
        except DERError:
            own = None
        if own is not None:
            return (
                f": this is the certificate of issuer {own.name} itself, not one it issued; "
                "send only subscriber certificates and precertificates (a chain file?)"
            )
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
            is_ca = constraints.value.ca
        except (x509.ExtensionNotFound, ValueError):
            is_ca = False
        if is_ca:
            return (
                ": this is a CA certificate (basicConstraints cA=TRUE); send only "
                "subscriber certificates and precertificates (a chain file?)"
            )
        return ": add it to `issuers` first"

    async def prepare_all(
        self, certs: Sequence[x509.Certificate]
    ) -> tuple[list[PreparedRecord], list[tuple[int, CertificateRejected]]]:
        """Prepare every certificate; returns the good ones and (index, why) for the rest."""
        prepared: list[PreparedRecord] = []
        rejected: list[tuple[int, CertificateRejected]] = []
        for index, cert in enumerate(certs):
            if index and index % PREPARE_SLICE == 0:
                await asyncio.sleep(0)
            try:
                if self._off_loop:
                    prepared.append(await asyncio.to_thread(self.prepare, cert))
                else:
                    prepared.append(self.prepare(cert))
            except CertificateRejected as exc:
                rejected.append((index, exc))
                metrics.recording_failures_total.labels(
                    "unknown_issuer" if exc.status == 422 else "refused"
                ).inc()
                log.warning(
                    "recording refused: serial=%s issuer=%s: %s",
                    describe_certificate_serial(cert),
                    describe_issuer(cert),
                    exc,
                )
            except Exception as exc:
                # the whole call fails: nothing of it is written or acknowledged
                reason = "signing" if isinstance(exc, SigningError) else "internal"
                metrics.recording_failures_total.labels(reason).inc(len(certs) - len(rejected))
                log.error(
                    "recording FAILED (not acknowledged): could not prepare: serial=%s "
                    "issuer=%s reason=%s: %s (and the %d other certificates of this call)",
                    describe_certificate_serial(cert),
                    describe_issuer(cert),
                    reason,
                    exc,
                    len(certs) - len(rejected) - 1,
                )
                raise
        return prepared, rejected

    async def commit(self, prepared: Sequence[PreparedRecord]) -> list[RecordOutcome]:
        """Store all prepared records in one transaction; returns after the durable commit.

        On failure every serial is logged at ERROR and counted, and the exception
        propagates: the caller must tell its client "not recorded". A serial collision
        (nothing written either) raises SerialCollisionRejected (409), logging and
        counting the colliding certificates only."""
        if not prepared:
            return []
        try:
            recorded = await self.store.record_certificates(
                [(p.record, p.signed) for p in prepared]
            )
        except SerialCollision as exc:
            raise self._collided(prepared, exc.collisions) from exc
        except BaseException as exc:
            reason = exc.reason if isinstance(exc, StoreUnavailable) else "internal"
            if isinstance(exc, asyncio.CancelledError):
                reason = "cancelled"
            metrics.recording_failures_total.labels(reason).inc(len(prepared))
            for p in prepared:
                log.error(
                    "recording FAILED (not acknowledged): issuer=%s serial=%s reason=%s: %s",
                    p.issuer,
                    format_serial(p.record.serial),
                    reason,
                    exc,
                )
            raise
        outcomes = []
        for p, done in zip(prepared, recorded, strict=True):
            metrics.recordings_total.labels(
                p.issuer, "created" if done.created else "existing"
            ).inc()
            outcomes.append(
                RecordOutcome(
                    serial=p.record.serial,
                    issuer=p.issuer,
                    precertificate=p.record.precertificate,
                    created=done.created,
                    status=done.stored.status,
                    this_update=done.stored.this_update,
                    next_update=done.stored.next_update,
                )
            )
        return outcomes

    @staticmethod
    def _collided(
        prepared: Sequence[PreparedRecord], collisions: list[Collision]
    ) -> SerialCollisionRejected:
        """Log (ERROR: a CA issued two certificates with one serial), count and describe
        each collision; nothing of the call was written."""
        described: list[tuple[int, CertificateRejected]] = []
        for c in collisions:
            issuer = prepared[c.index].issuer
            serial = format_serial(c.serial)
            metrics.recording_failures_total.labels("serial_collision").inc()
            log.error(
                "recording REFUSED (serial collision, nothing of the call written): "
                "issuer=%s serial=%s is recorded for another certificate "
                "(tbs_sha256 %s; this one %s): the CA issued two certificates with one "
                "serial (BR 7.1, RFC 5280 4.1.2.2)",
                issuer,
                serial,
                c.held.hex(),
                c.submitted.hex(),
            )
            described.append(
                (
                    c.index,
                    CertificateRejected(
                        f"serial collision: issuer {issuer} serial {serial} is already "
                        f"recorded for another certificate (TBSCertificate SHA-256 "
                        f"{c.held.hex()[:16]}..., this one {c.submitted.hex()[:16]}...): "
                        "serials must be unique per issuer (BR 7.1, RFC 5280 4.1.2.2); "
                        "not recorded",
                        status=409,
                    ),
                )
            )
        return SerialCollisionRejected(described, prepared[collisions[0].index].issuer)

    async def record(self, certs: Sequence[x509.Certificate]) -> list[RecordOutcome]:
        """Record all ``certs`` in one transaction, all or nothing; returns after the commit.

        Raises ``CertificateRejected`` (the first refusal) before writing anything."""
        prepared, rejected = await self.prepare_all(certs)
        if rejected:
            raise rejected[0][1]
        return await self.commit(prepared)


def certificate_serial(cert: x509.Certificate) -> int:
    """The certificate's serial if RFC 5280 allows it, else CertificateRejected (400): a
    zero, negative or over-long serial is refused like any malformed certificate."""
    try:
        return check_serial(_serial_number(cert))
    except SerialError as exc:
        raise CertificateRejected(str(exc)) from exc


def tbs_fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the TBSCertificate without the CT poison and SCT list extensions: the
    same for a precertificate and its final certificate (RFC 6962 3.1), the only two
    certificates that may share an issuer and serial. CertificateRejected (400) when the
    TBSCertificate does not walk strictly."""
    try:
        return hashlib.sha256(tbs_without_ct_extensions(cert.tbs_certificate_bytes)).digest()
    except DERError as exc:
        raise CertificateRejected(f"cannot read the TBSCertificate: {exc}") from exc


def describe_issuer(cert: x509.Certificate) -> str:
    """The issuer name for messages and logs, quoted and bounded."""
    try:
        return quote(cert.issuer.rfc4514_string(), 128)
    except ValueError:
        return "?"


def describe_certificate_serial(cert: x509.Certificate) -> str:
    try:
        return describe_serial(_serial_number(cert))
    except ValueError:
        return "?"


def _serial_number(cert: x509.Certificate) -> int:
    """``cert.serial_number`` without cryptography's deprecation warning for a zero or
    negative one: check_serial refuses those with a message that says why."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return cert.serial_number
