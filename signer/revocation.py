"""Revocation: record it and re-sign the serial's response as revoked, at once."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from cryptography import x509

from responder.cdn_purge import CdnPurger
from responder.metrics import revocations_total
from responder.response_cache import ResponseCache
from responder.store import PresignedStore, serial_key, with_retries
from signer.issuers import Issuer
from signer.response_builder import (
    CertStatus,
    Revocation,
    SignedResponse,
    ValidityPolicy,
    sign_response,
    whole_seconds,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RevocationOutcome:
    created: bool
    signed: SignedResponse
    revocation: Revocation
    #: CDN purge hook result: "purged", "pending", "failed" or "none" (no hook configured)
    cdn_purge: str = "none"


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
    ) -> None:
        self.store = store
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
        write), but it is logged: it means a recording went missing.
        """
        now = whole_seconds(dt.datetime.now(dt.UTC))
        when = whole_seconds(revoked_at) if revoked_at is not None else now
        if when > now + dt.timedelta(minutes=5):
            raise ValueError("revocation time is in the future")
        knowledge = await with_retries(
            lambda: self.store.knowledge(issuer.db_id, serial), "revocation lookup"
        )
        if knowledge.revocation is not None:
            revocation = knowledge.revocation
        else:
            revocation = Revocation(when, reason)
            if not knowledge.known:
                log.warning(
                    "revoking serial %x of issuer %s that was never recorded", serial, issuer.name
                )
        signed = sign_response(
            issuer, serial, CertStatus.REVOKED, self.policy, revocation=revocation
        )
        created = await self.store.record_revocation(issuer.db_id, serial, revocation, signed)
        if created:
            revocations_total.labels(issuer.name).inc()
        if self.store.replicas is not None:
            # read this serial from the primary until the replicas have replayed it
            await self.store.replicas.pin(issuer.db_id, serial_key(serial))
        if self.cache is not None:
            self.cache.drop_serial(issuer.db_id, serial)
        purge = "none"
        if self.purger is not None:
            purge = await self.purger.purge(issuer, serial, wait_settle=wait_for_cdn)
        return RevocationOutcome(
            created=created, signed=signed, revocation=revocation, cdn_purge=purge
        )
