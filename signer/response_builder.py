"""Building and signing OCSP responses.

Every successful answer this service gives was produced here, so this module owns the
rules a response must meet: the CertID echoes the request's hash algorithm, times are
whole seconds, validity stays inside BR 4.9.9 (8 hours to 10 days) and never reaches past
the signing certificate's notAfter, revocation reasons are BR 7.3 reasons only, and a
delegated responder signs byKey with its certificate included.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from enum import IntEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from responder.metrics import signing_seconds
from signer.external_signature import sign_with_token
from signer.issuers import (
    CERT_ID_HASHES,
    Issuer,
    IssuerConfigError,
    ResponderIdentity,
    signature_hash_for,
)
from signer.pkcs11_key import Pkcs11Key, TokenSigningError

MIN_VALIDITY = dt.timedelta(hours=8)
MAX_VALIDITY = dt.timedelta(days=10)


class CertStatus(IntEnum):
    GOOD = 0
    REVOKED = 1


class SigningError(Exception):
    """A response could not be signed (e.g. the signer certificate expires too soon)."""


class RevocationReasonError(ValueError):
    """A revocation reason that BR 7.3 does not allow for subscriber certificates."""


#: BR 7.3 / 7.2.2 reasons for subscriber certificates; "unspecified" is sent without a code.
ALLOWED_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}
REASON_CODES: dict[x509.ReasonFlags, int] = {
    x509.ReasonFlags.unspecified: 0,
    x509.ReasonFlags.key_compromise: 1,
    x509.ReasonFlags.affiliation_changed: 3,
    x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5,
    x509.ReasonFlags.privilege_withdrawn: 9,
}
REASONS_BY_CODE = {code: flag for flag, code in REASON_CODES.items()}


#: a reason code given as text: ASCII digits only, short (``re`` ``[0-9]``, not ``\d``,
#: which matches every Unicode decimal digit)
_REASON_CODE_TEXT = re.compile(r"[0-9]{1,3}")


_NAMES_BY_REASON = {flag: name for name, flag in ALLOWED_REASONS.items()}


def reason_name(reason: x509.ReasonFlags) -> str:
    """The RFC 5280 name of a reason (``keyCompromise``): what the API and CLI accept as
    input, so an answer's reason can be sent back as it is."""
    return _NAMES_BY_REASON.get(reason, reason.name)


def parse_reason(value: object) -> x509.ReasonFlags:
    """A BR-allowed reason by RFC 5280 name or code; certificateHold and CA reasons refused.

    Accepted: a reason name spelled exactly as in ALLOWED_REASONS, an ``int`` code (a JSON
    integer; ``True``/``False`` are refused, not read as 1/0), or a short string of ASCII
    digits (what the CLI's ``--reason 1`` gives). ``str.isdigit`` alone would also take
    "\\u0661" (Arabic-Indic one: keyCompromise) or "\\u00b2" (int() then raises): anything
    that is not one of these is a RevocationReasonError naming the allowed reasons.
    """
    flag: x509.ReasonFlags | None = None
    if isinstance(value, bool):
        flag = None
    elif isinstance(value, int):
        flag = REASONS_BY_CODE.get(value)
    elif isinstance(value, str):
        if _REASON_CODE_TEXT.fullmatch(value):
            flag = REASONS_BY_CODE.get(int(value))
        else:
            flag = ALLOWED_REASONS.get(value)
    if flag is None:
        allowed = ", ".join(f"{name} ({REASON_CODES[f]})" for name, f in ALLOWED_REASONS.items())
        plain = isinstance(value, str | int) and not isinstance(value, bool)
        shown = repr(value) if plain else f"of type {type(value).__name__}"
        raise RevocationReasonError(
            f"revocation reason {shown[:80]} is not allowed for subscriber certificates "
            f"(BR 7.3; certificateHold is never allowed): use one of {allowed}"
        )
    return flag


@dataclass(frozen=True, slots=True)
class Revocation:
    revoked_at: dt.datetime
    reason: x509.ReasonFlags


@dataclass(frozen=True, slots=True)
class ValidityPolicy:
    """How long responses are valid, and when they must be renewed (BR 4.9.9)."""

    validity: dt.timedelta = dt.timedelta(days=4)
    refresh_margin: dt.timedelta = dt.timedelta(days=2)  # renew this long before nextUpdate
    backdate: dt.timedelta = dt.timedelta(hours=1)  # thisUpdate in the past, for client clock skew

    def check(self) -> None:
        """Refuse settings that would break BR 4.9.9, naming the rule."""
        if not MIN_VALIDITY <= self.validity <= MAX_VALIDITY:
            raise ValueError("response_validity must be between 8h and 10d (BR 4.9.9)")
        if self.validity >= dt.timedelta(hours=16):
            if self.refresh_margin < dt.timedelta(hours=8):
                raise ValueError("refresh_margin must be >= 8h when validity >= 16h (BR 4.9.9)")
            if self.validity - self.refresh_margin > dt.timedelta(days=4):
                raise ValueError(
                    "response_validity - refresh_margin must be <= 4d: a new response is due "
                    "no later than 4 days after thisUpdate (BR 4.9.9)"
                )
        elif self.refresh_margin < self.validity / 2:
            raise ValueError("refresh_margin must be >= half the validity when validity < 16h")
        if self.refresh_margin >= self.validity:
            raise ValueError("refresh_margin must be shorter than response_validity")
        if self.backdate < dt.timedelta(0) or self.backdate > dt.timedelta(hours=2):
            raise ValueError("this_update_backdate must be between 0 and 2h")


#: BR 4.9.9 for validity >= 16 h: a new response at least this long before nextUpdate ...
BR_MIN_LEAD = dt.timedelta(hours=8)
#: ... and no later than this long after thisUpdate.
BR_MAX_AGE = dt.timedelta(days=4)
#: Validity from which the two rules above apply; below it, renew before half has passed.
BR_LONG_VALIDITY = dt.timedelta(hours=16)


def br_refresh_deadline(this_update: int, next_update: int) -> int:
    """The latest moment (Unix seconds) BR 4.9.9 allows a new response for this one."""
    validity = next_update - this_update
    if validity >= BR_LONG_VALIDITY.total_seconds():
        return int(
            min(
                next_update - BR_MIN_LEAD.total_seconds(),
                this_update + BR_MAX_AGE.total_seconds(),
            )
        )
    return this_update + validity // 2


def renewal_point(this_update: int, next_update: int, policy: ValidityPolicy) -> int:
    """When a response stops being served as-is and is re-signed (Unix seconds).

    A response with the configured validity renews ``refresh_margin`` before nextUpdate
    (``ValidityPolicy.check`` proves that is within BR 4.9.9). A longer one (signed
    before ``response_validity`` was lowered, e.g. 7 days with a 3-day margin, now 4 days
    and 2) renews at that point or its BR deadline, whichever comes first: ``next_update -
    margin`` alone would be 5 days after its thisUpdate. A response whose nextUpdate
    was capped by an expiring signer certificate is shorter: ``next_update - margin``
    could lie before its thisUpdate and make it due forever, so it renews at its own
    BR deadline instead."""
    if next_update - this_update >= policy.validity.total_seconds():
        return min(
            next_update - int(policy.refresh_margin.total_seconds()),
            br_refresh_deadline(this_update, next_update),
        )
    return br_refresh_deadline(this_update, next_update)


@dataclass(frozen=True, slots=True)
class SignedResponse:
    """A signed DER response and the facts about it the serving path needs."""

    der: bytes
    status: CertStatus
    this_update: int  # Unix seconds
    next_update: int
    hash_algorithm: str = "sha1"
    #: ResponderIdentity.fingerprint64 of the certificate that signed it (0: unknown)
    signer: int = 0


def whole_seconds(moment: dt.datetime) -> dt.datetime:
    return moment.replace(microsecond=0)


def response_window(
    issuer: Issuer,
    policy: ValidityPolicy,
    moment: dt.datetime,
    revocation: Revocation | None = None,
) -> tuple[ResponderIdentity, dt.datetime, dt.datetime]:
    """The signer and thisUpdate/nextUpdate for a response made at ``moment`` (whole
    seconds): backdated (never before the signer's notBefore), never before a revocation,
    never past the signer's notAfter nor the issuer certificate's (a chain that has
    expired validates nothing).

    No usable signer is a ``SigningError`` like any other refusal, so that every caller
    (recording, revocation, refresher, on-demand) reports it as one clear line."""
    try:
        responder = issuer.active_responder(moment)
    except IssuerConfigError as exc:
        raise SigningError(str(exc)) from exc
    # backdated for client clock skew, but never before the signer's own notBefore: in
    # the first hour of a new responder certificate a response said it was known correct
    # at a time its signer did not exist yet (clients accept it; nothing needs it)
    this_update = max(moment - policy.backdate, whole_seconds(responder.not_before))
    if revocation is not None:
        # never claim to have known of a revocation before it happened
        this_update = max(this_update, min(whole_seconds(revocation.revoked_at), moment))
    issuer_not_after = issuer.certificate.not_valid_after_utc
    limit = min(responder.not_after, issuer_not_after)
    next_update = min(this_update + policy.validity, whole_seconds(limit))
    if next_update - this_update < MIN_VALIDITY:
        delegated_first = responder.delegated and responder.not_after <= issuer_not_after
        which = "responder" if delegated_first else "issuer"
        raise SigningError(
            f"issuer {issuer.name}: {which} certificate expires "
            f"{limit:%Y-%m-%d %H:%M}Z, too soon for a response valid 8h "
            "(BR 4.9.9): configure a new one"
        )
    return responder, this_update, next_update


def sign_response(
    issuer: Issuer,
    serial: int,
    status: CertStatus,
    policy: ValidityPolicy,
    *,
    revocation: Revocation | None = None,
    hash_algorithm: str = "sha1",
    nonce: bytes | None = None,
    nonce_wrapped: bool = True,
    now: dt.datetime | None = None,
) -> SignedResponse:
    """Sign one response for ``serial`` with the issuer's active responder identity.

    ``nonce_wrapped=False``: the client sent the nonce as the bare extnValue (RFC 2560
    reading); it is echoed the same way, since such a client compares extnValues."""
    moment = whole_seconds(now or dt.datetime.now(dt.UTC))
    responder, this_update, next_update = response_window(issuer, policy, moment, revocation)
    name_hash, key_hash = issuer.cert_id_hashes[hash_algorithm]
    revocation_time: dt.datetime | None = None
    revocation_reason: x509.ReasonFlags | None = None
    if status is CertStatus.REVOKED:
        if revocation is None:
            raise SigningError("a revoked response needs a revocation time")
        revocation_time = whole_seconds(revocation.revoked_at)
        if revocation.reason is not x509.ReasonFlags.unspecified:  # unspecified: no code
            revocation_reason = revocation.reason
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=name_hash,
        issuer_key_hash=key_hash,
        serial_number=serial,
        algorithm=CERT_ID_HASHES[hash_algorithm](),
        cert_status=(
            ocsp.OCSPCertStatus.REVOKED
            if status is CertStatus.REVOKED
            else ocsp.OCSPCertStatus.GOOD
        ),
        this_update=this_update,
        next_update=next_update,
        revocation_time=revocation_time,
        revocation_reason=revocation_reason,
    )
    if responder.delegated:
        builder = builder.certificates([responder.certificate])
    if nonce is not None:
        builder = builder.add_extension(
            x509.OCSPNonce(nonce)
            if nonce_wrapped
            else x509.UnrecognizedExtension(x509.oid.OCSPExtensionOID.NONCE, nonce),
            critical=False,
        )
    algorithm: hashes.HashAlgorithm | None = signature_hash_for(responder.key)
    started = time.perf_counter()
    if isinstance(responder.key, Pkcs11Key):
        assert algorithm is not None
        try:
            der = sign_with_token(builder, responder.key, responder.certificate, algorithm)
        except TokenSigningError as exc:
            raise SigningError(f"issuer {issuer.name}: {exc}") from exc
    else:
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder.certificate)
        der = builder.sign(responder.key, algorithm).public_bytes(Encoding.DER)
    signing_seconds.labels(issuer.name).observe(time.perf_counter() - started)
    return SignedResponse(
        der=der,
        status=status,
        this_update=int(this_update.timestamp()),
        next_update=int(next_update.timestamp()),
        hash_algorithm=hash_algorithm,
        signer=responder.fingerprint64,
    )
