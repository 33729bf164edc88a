"""Fast signing of the pre-signed "good" responses made at issuance.

``sign_response`` goes through cryptography's ``OCSPResponseBuilder``, which costs about
four times the signature itself. Recording thousands of certificates a second needs the
same bytes cheaper, so for the one shape recording makes (status good, SHA-1 CertID, no
nonce) we fill a template instead: everything but the serial and the three times is
fixed per responder identity.

The template is not hand-written from the RFC: it is cut out of a response the builder
signed, and before it is used we rebuild that very response from the template and demand
byte-for-byte the same TBSResponseData. Any difference (a new cryptography version that
encodes something differently, an identity we do not understand) makes ``PresignTemplate``
refuse, and the recorder falls back to the builder.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.x509 import ocsp
from prometheus_client import Histogram

from responder.metrics import signing_seconds
from signer.der import DERError, element_children, read_element
from signer.issuers import Issuer, ResponderIdentity, signature_function
from signer.pkcs11_key import TokenSigningError
from signer.response_builder import (
    CertStatus,
    SignedResponse,
    SigningError,
    ValidityPolicy,
    response_window,
    sign_response,
    whole_seconds,
)

log = logging.getLogger(__name__)

_OID_PKIX_OCSP_BASIC = bytes.fromhex("06092b0601050507300101")
_GOOD = b"\x80\x00"  # certStatus good: [0] IMPLICIT NULL


class TemplateMismatch(Exception):
    """The builder's output does not have the shape the template expects."""


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, value: bytes) -> bytes:
    # per signature this runs a dozen times: the short and two-byte forms inline
    length = len(value)
    if length < 0x80:
        return bytes((tag, length)) + value
    if length < 0x100:
        return bytes((tag, 0x81, length)) + value
    if length < 0x10000:
        return bytes((tag, 0x82, length >> 8, length & 0xFF)) + value
    return bytes((tag,)) + encode_length(length) + value


def encode_integer(value: int) -> bytes:
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def generalized_time(moment: dt.datetime) -> bytes:
    return tlv(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode())


@dataclass(frozen=True, slots=True)
class PresignTemplate:
    """The fixed parts of one responder identity's good/SHA-1 responses."""

    responder: ResponderIdentity
    responder_id: bytes  # [1] byName or [2] byKey, as the builder encoded it
    cert_id_head: bytes  # AlgorithmIdentifier + issuerNameHash + issuerKeyHash TLVs
    signature_algorithm: bytes
    certs: bytes  # [0] certs, or b""
    #: the responder key's signing call, its algorithm resolved once
    sign_tbs: Callable[[bytes], bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sign_tbs", signature_function(self.responder.key))

    @classmethod
    def for_issuer(
        cls, issuer: Issuer, responder: ResponderIdentity, policy: ValidityPolicy
    ) -> PresignTemplate:
        """Cut a template out of a builder-signed response and prove it reproduces it."""
        moment = whole_seconds(dt.datetime.now(dt.UTC))
        reference = sign_response(issuer, 1, CertStatus.GOOD, policy, now=moment)
        try:
            template, tbs = cls._cut(responder, reference.der)
        except (DERError, IndexError, ValueError) as exc:
            raise TemplateMismatch(f"cannot read the reference response: {exc}") from exc
        parsed = ocsp.load_der_ocsp_response(reference.der)
        if parsed.next_update_utc is None:
            raise TemplateMismatch("the reference response has no nextUpdate")
        rebuilt = template.tbs(
            1, parsed.produced_at_utc, parsed.this_update_utc, parsed.next_update_utc
        )
        if rebuilt != tbs:
            raise TemplateMismatch("rebuilt TBSResponseData differs from the builder's")
        return template

    @classmethod
    def _cut(cls, responder: ResponderIdentity, der: bytes) -> tuple[PresignTemplate, bytes]:
        outer = read_element(der)
        status, response_bytes = element_children(der, outer)
        if der[status.start : status.end] != b"\x0a\x01\x00" or response_bytes.tag != 0xA0:
            raise TemplateMismatch("not a successful OCSPResponse")
        (rb_seq,) = element_children(der, response_bytes)
        oid, octets = element_children(der, rb_seq)
        if der[oid.start : oid.end] != _OID_PKIX_OCSP_BASIC or octets.tag != 0x04:
            raise TemplateMismatch("not an id-pkix-ocsp-basic response")
        basic = der[octets.value_start : octets.end]
        parts = element_children(basic, read_element(basic))
        tbs_tlv, sig_alg, _sig = parts[:3]
        certs = basic[parts[3].start : parts[3].end] if len(parts) > 3 else b""
        tbs = basic[tbs_tlv.start : tbs_tlv.end]
        fields = element_children(tbs, read_element(tbs))
        if len(fields) != 3 or fields[0].tag not in (0xA1, 0xA2) or fields[1].tag != 0x18:
            raise TemplateMismatch("TBSResponseData has a version or extensions")
        (single,) = element_children(tbs, fields[2])
        single_parts = element_children(tbs, single)
        if len(single_parts) != 4:
            raise TemplateMismatch("SingleResponse has extensions")
        cert_id = element_children(tbs, single_parts[0])
        head = tbs[cert_id[0].start : cert_id[2].end]
        template = cls(
            responder=responder,
            responder_id=tbs[fields[0].start : fields[0].end],
            cert_id_head=head,
            signature_algorithm=basic[sig_alg.start : sig_alg.end],
            certs=certs,
        )
        return template, tbs

    def tbs(
        self, serial: int, produced: dt.datetime, this_update: dt.datetime, next_update: dt.datetime
    ) -> bytes:
        """TBSResponseData for one serial (the bytes that get signed)."""
        return self.tbs_with_times(serial, *self.encode_times(produced, this_update, next_update))

    def encode_times(
        self, produced: dt.datetime, this_update: dt.datetime, next_update: dt.datetime
    ) -> tuple[bytes, bytes]:
        """The encoded (producedAt, status+thisUpdate+nextUpdate): shared within a second."""
        return generalized_time(produced), (
            _GOOD + generalized_time(this_update) + tlv(0xA0, generalized_time(next_update))
        )

    def tbs_with_times(self, serial: int, produced: bytes, status_and_times: bytes) -> bytes:
        cert_id = tlv(0x30, self.cert_id_head + encode_integer(serial))
        single = tlv(0x30, cert_id + status_and_times)
        return tlv(0x30, self.responder_id + produced + tlv(0x30, single))

    def sign(self, tbs: bytes) -> bytes:
        signature = self.sign_tbs(tbs)  # file key or PKCS#11 token
        basic = tlv(
            0x30, tbs + self.signature_algorithm + tlv(0x03, b"\x00" + signature) + self.certs
        )
        return tlv(
            0x30,
            b"\x0a\x01\x00" + tlv(0xA0, tlv(0x30, _OID_PKIX_OCSP_BASIC + tlv(0x04, basic))),
        )


_Window = tuple[PresignTemplate | None, tuple[bytes, bytes] | None, int, int]


class PresignedSigner:
    """Signs the good/SHA-1 responses recorded at issuance, through templates when it can."""

    def __init__(self, policy: ValidityPolicy) -> None:
        self.policy = policy
        # keyed by object identity: issuers and identities live as long as the process
        self._templates: dict[tuple[int, int], PresignTemplate | None] = {}
        # the last second's window per issuer: times and their encodings change once a second
        self._window: tuple[dt.datetime, Issuer, _Window] | None = None
        self._timers: dict[str, Histogram] = {}

    def _template(self, issuer: Issuer, responder: ResponderIdentity) -> PresignTemplate | None:
        key = (id(issuer), id(responder))
        if key not in self._templates:
            try:
                self._templates[key] = PresignTemplate.for_issuer(issuer, responder, self.policy)
            except TemplateMismatch as exc:
                log.warning("issuer %s: presigning through the builder: %s", issuer.name, exc)
                self._templates[key] = None
        return self._templates[key]

    def sign_good(
        self, issuer: Issuer, serial: int, now: dt.datetime | None = None
    ) -> SignedResponse:
        """The same response ``sign_response(issuer, serial, GOOD, policy)`` would make."""
        moment = whole_seconds(now or dt.datetime.now(dt.UTC))
        cached = self._window
        if cached is not None and cached[0] == moment and cached[1] is issuer:
            window = cached[2]
        else:
            responder, this_update, next_update = response_window(issuer, self.policy, moment)
            template = self._template(issuer, responder)
            times = template.encode_times(moment, this_update, next_update) if template else None
            window = (template, times, int(this_update.timestamp()), int(next_update.timestamp()))
            self._window = (moment, issuer, window)
        template, times, this_ts, next_ts = window
        if template is None or times is None:
            return sign_response(issuer, serial, CertStatus.GOOD, self.policy, now=moment)
        started = time.perf_counter()
        try:
            der = template.sign(template.tbs_with_times(serial, *times))
        except TokenSigningError as exc:  # the same refusal sign_response reports
            raise SigningError(f"issuer {issuer.name}: {exc}") from exc
        timer = self._timers.get(issuer.name)
        if timer is None:
            timer = self._timers[issuer.name] = signing_seconds.labels(issuer.name)
        timer.observe(time.perf_counter() - started)
        return SignedResponse(
            der=der,
            status=CertStatus.GOOD,
            this_update=this_ts,
            next_update=next_ts,
            signer=template.responder.fingerprint64,
        )
