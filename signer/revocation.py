"""Revocation: record it and re-sign the serial's response as revoked, at once."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import logging
import re
from dataclasses import dataclass

from cryptography import x509

from responder.cdn_purge import CdnPurger
from responder.metrics import revocations_total
from responder.response_cache import ResponseCache
from responder.store import (
    PresignedStore,
    StoreUnavailable,
    serial_key,
)
from signer.issuers import Issuer, IssuerRegistry
from signer.recording import quote
from signer.response_builder import (
    CertStatus,
    Revocation,
    SignedResponse,
    ValidityPolicy,
    reason_name,
    sign_response,
    whole_seconds,
)

log = logging.getLogger(__name__)


#: a revocation dated later than this is refused (clock skew between the CA and us)
FUTURE_TOLERANCE = dt.timedelta(minutes=5)
#: attempts when a concurrent revocation of the same serial changes the row between our
#: read and our write (each attempt decides again on what is then stored)
DECIDE_ATTEMPTS = 3


class RevocationTimeError(ValueError):
    """A revocation time that cannot be right: unreadable, unrepresentable, in the future,
    or before the issuer's certificate existed."""


class RevocationConflict(Exception):
    """The serial is already revoked and the request would change it in a way that is not
    allowed (only a later keyCompromise may): nothing was written, ``stored`` stands."""

    def __init__(self, stored: Revocation, requested: Revocation) -> None:
        asked = reason_name(requested.reason)
        if requested.revoked_at != stored.revoked_at:
            asked += f" at {requested.revoked_at.isoformat()}"
        super().__init__(
            f"already revoked at {stored.revoked_at.isoformat()} ({reason_name(stored.reason)}): "
            f"request ({asked}) not applied; only keyCompromise may change an existing "
            "revocation (MRSP 6.1.1)"
        )
        self.stored = stored
        self.requested = requested


#: RFC 3339 section 5.6 date-time (T and Z in either case, fraction allowed, zone required)
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})",
    re.ASCII,
)


def parse_revocation_time(text: object) -> dt.datetime:
    """An ISO 8601 time with a zone, as UTC whole seconds; RevocationTimeError otherwise.

    The conversion to UTC happens here, where a bad value is still input: a time such as
    0001-01-01T00:00:00+01:00 lies before datetime's year 1 in UTC and would otherwise
    raise OverflowError while signing."""
    if not isinstance(text, str):
        raise RevocationTimeError(
            "revocation time must be an ISO 8601 string with a zone, e.g. 2026-01-02T03:04:05Z"
        )
    if not _RFC3339.fullmatch(text):
        # datetime.fromisoformat alone also takes a space for T, offsets with seconds
        # (+00:00:30.5, a time shifted by 30.5 s) and no zone at all
        raise RevocationTimeError(
            f"revocation time {quote(text)} is not an RFC 3339 date-time with a zone "
            "(e.g. 2026-01-02T03:04:05Z or 2026-01-02T04:04:05+01:00)"
        )
    try:
        when = dt.datetime.fromisoformat(text.upper())
    except ValueError as exc:  # e.g. month 13, second 60
        raise RevocationTimeError(f"revocation time {quote(text)} is not ISO 8601: {exc}") from exc
    return utc_whole_seconds(when)


def utc_whole_seconds(when: dt.datetime) -> dt.datetime:
    """``when`` in UTC, whole seconds; RevocationTimeError when UTC cannot hold it."""
    if when.tzinfo is None:
        raise RevocationTimeError("revocation time needs a time zone")
    try:
        return whole_seconds(when.astimezone(dt.UTC))
    except OverflowError as exc:
        raise RevocationTimeError(
            f"revocation time {when.isoformat()} is out of range in UTC"
        ) from exc


def earliest_revocation_time(issuer: Issuer) -> dt.datetime:
    """The earliest revocation time accepted for a serial of ``issuer``: its certificate's
    notBefore (nothing it signed can have been revoked before it existed).

    A per-certificate bound (the certificate's own notBefore) would be tighter, but the
    store keeps no notBefore; ``notAfter - 398 days`` is no substitute: for a misissued
    certificate valid longer than BR 6.3.2 allows (exactly one that must be revoked) it
    would lie after the true notBefore, even in the future, and refuse a true time."""
    return issuer.certificate.not_valid_before_utc


@dataclass(frozen=True, slots=True)
class RevocationOutcome:
    created: bool
    signed: SignedResponse
    revocation: Revocation
    #: CDN purge hook result: "purged", "pending", "failed" or "none" (no hook configured)
    cdn_purge: str = "none"
    #: an existing revocation was changed (reason raised to keyCompromise, or an earlier
    #: keyCompromise time): re-signed and invalidated like a first revocation
    updated: bool = False
    #: the serial was recorded for this issuer or seen in CT under it; False is still a
    #: revocation (a lost recording), but the CA must hear it: a wrong issuer or a typo
    #: in the serial leaves the certificate it meant "good"
    known: bool = True
    #: names of the other configured issuers that did record or see this serial (only
    #: looked up when ``known`` is False): the issuer the CA probably meant
    known_under: tuple[str, ...] = ()

    def warning(self, issuer: str) -> str | None:
        """What the CA must check when the serial was not known, else None."""
        if self.known:
            return None
        text = (
            f"serial was never recorded for issuer {issuer} nor seen in CT under it: "
            "revoked anyway (a lost recording), but check the issuer and serial"
        )
        if self.known_under:
            text += (
                f"; it IS known under issuer {', '.join(self.known_under)}, whose "
                "certificate stays good unless revoked there"
            )
        return text


def merge_revocation(
    stored: Revocation, reason: x509.ReasonFlags, revoked_at: dt.datetime | None
) -> Revocation:
    """What a repeated revocation leaves stored; RevocationConflict when it is refused.

    keyCompromise may replace any other reason, and may move the time earlier: the
    earliest known time wins (BR 7.2.2 note: the revocation date SHOULD be updated when
    the key was compromised before it). Anything else must repeat what is stored
    (``revoked_at`` omitted or equal): a CA cannot lower or swap a reason, nor move a
    revocation's time, through a repeat."""
    key_compromise = x509.ReasonFlags.key_compromise
    if reason is key_compromise:
        when = stored.revoked_at if revoked_at is None else min(stored.revoked_at, revoked_at)
        return Revocation(when, key_compromise)
    if reason is stored.reason and (revoked_at is None or revoked_at == stored.revoked_at):
        return stored
    raise RevocationConflict(stored, Revocation(revoked_at or stored.revoked_at, reason))


class Revoker:
    """Revoke, then make every copy of the old answer go: this process's cache at once,
    other processes' through the NOTIFY sent in the revocation transaction, the CDN's
    through the purge hook (after the commit, bounded in time)."""

    def __init__(
        self,
        store: PresignedStore,
        policy: ValidityPolicy,
        *,
        cache: ResponseCache | None = None,
        purger: CdnPurger | None = None,
        registry: IssuerRegistry | None = None,
    ) -> None:
        self.store = store
        #: to name the issuer that knows a serial revoked under another (see warning)
        self.registry = registry
        self.policy = policy
        self.cache = cache
        self.purger = purger

    async def revoke(
        self,
        issuer: Issuer,
        serial: int,
        reason: x509.ReasonFlags,
        revoked_at: dt.datetime | None = None,
        *,
        wait_for_cdn: bool = False,
    ) -> RevocationOutcome:
        """Store the revocation with its revoked response in one transaction.

        A serial we never heard of is still revoked (the CA knows better than a lost
        write), but it is logged: it means a recording went missing. A serial already
        revoked changes only as ``merge_revocation`` allows (else RevocationConflict).
        Times out of range raise RevocationTimeError before anything is written.
        """
        now = whole_seconds(dt.datetime.now(dt.UTC))
        when = utc_whole_seconds(revoked_at) if revoked_at is not None else None
        if when is not None and when > now + FUTURE_TOLERANCE:
            raise RevocationTimeError(
                f"revocation time {when.isoformat()} is in the future (now {now.isoformat()})"
            )
        if when is not None and when > now:
            # within the clock-skew tolerance: the revocation takes effect now, so it is
            # dated now. A later date would say the certificate was still valid after
            # the response that calls it revoked (thisUpdate), and a relying party that
            # compares revocationTime with a signing time would accept a signature made
            # with a compromised key in the meantime. Read as "no time given", not as
            # this instant: a retry of the same request then repeats what is stored
            # (200) instead of naming another time (409).
            when = None
        floor = earliest_revocation_time(issuer)
        if when is not None and when < floor:
            raise RevocationTimeError(
                f"revocation time {when.isoformat()} is before {floor.isoformat()}, the "
                f"notBefore of issuer {issuer.name}'s certificate"
            )
        for _ in range(DECIDE_ATTEMPTS):
            context = await self.store.revocation_context(issuer.db_id, serial)
            stored = context.revocation
            if stored is None:
                revocation = Revocation(when or now, reason)
            else:
                revocation = merge_revocation(stored, reason, when)
            sign = functools.partial(
                sign_response,
                issuer,
                serial,
                CertStatus.REVOKED,
                self.policy,
                revocation=revocation,
            )
            # a token key's round trip runs in a thread (Issuer.token_signed)
            signed = await asyncio.to_thread(sign) if issuer.token_signed else sign()
            if stored is None:
                created = await self.store.record_revocation(
                    issuer.db_id, serial, revocation, signed
                )
                if not created:
                    continue  # revoked concurrently: decide again on what is stored now
                revocations_total.labels(issuer.name).inc()
                if not context.known:
                    log.warning(
                        "revoking serial %x of issuer %s that was never recorded",
                        serial,
                        issuer.name,
                    )
                updated = False
            elif revocation != stored:
                if not await self.store.replace_revocation(
                    issuer.db_id, serial, stored, revocation, signed
                ):
                    continue
                log.warning(
                    "revocation of serial %x of issuer %s changed from %s (%s) to %s (%s)",
                    serial,
                    issuer.name,
                    reason_name(stored.reason),
                    stored.revoked_at.isoformat(),
                    reason_name(revocation.reason),
                    revocation.revoked_at.isoformat(),
                )
                created, updated = False, True
            else:
                # an identical repeat: nothing to write, but the NOTIFY, cache drop and
                # CDN purge run again (a retry after a purge that failed the first time)
                await self.store.record_revocation(issuer.db_id, serial, revocation, signed)
                created = updated = False
            outcome = await self._invalidate(
                issuer, serial, revocation, signed, wait_for_cdn, created=created, updated=updated
            )
            if context.known:
                return outcome
            return dataclasses.replace(
                outcome, known=False, known_under=await self._known_under(issuer, serial)
            )
        raise StoreUnavailable(
            f"revocation of serial {serial:x}: changed concurrently {DECIDE_ATTEMPTS} times, retry",
            reason="conflict",
        )

    async def _known_under(self, issuer: Issuer, serial: int) -> tuple[str, ...]:
        """The other configured issuers that know ``serial`` (after the commit: a failed
        lookup must not undo the revocation, it only loses the hint)."""
        if self.registry is None:
            return ()
        others = {i.db_id: i.name for i in self.registry.issuers if i.db_id != issuer.db_id}
        try:
            ids = await self.store.issuers_knowing(serial, list(others))
        except StoreUnavailable as exc:
            log.warning("cannot tell which issuer knows serial %x: %s", serial, exc)
            return ()
        return tuple(others[i] for i in ids if i in others)

    async def _invalidate(
        self,
        issuer: Issuer,
        serial: int,
        revocation: Revocation,
        signed: SignedResponse,
        wait_for_cdn: bool,
        *,
        created: bool,
        updated: bool,
    ) -> RevocationOutcome:
        """After the commit: make every copy of the old answer go."""
        if self.store.replicas is not None:
            # read this serial from the primary until the replicas have replayed it
            await self.store.replicas.pin(issuer.db_id, serial_key(serial))
        if self.cache is not None:
            self.cache.drop_serial(issuer.db_id, serial)
        purge = "none"
        if self.purger is not None:
            purge = await self.purger.purge(issuer, serial, wait_settle=wait_for_cdn)
        return RevocationOutcome(
            created=created,
            signed=signed,
            revocation=revocation,
            cdn_purge=purge,
            updated=updated,
        )
