"""Revocation: record it and re-sign the serial's response as revoked, at once."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from cryptography import x509

from responder.store import PresignedStore, serial_key
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


class Revoker:
    def __init__(self, store: PresignedStore, policy: ValidityPolicy) -> None:
        self.store = store
        self.policy = policy

    async def revoke(
        self,
        issuer: Issuer,
        serial: int,
        reason: x509.ReasonFlags,
        revoked_at: dt.datetime | None = None,
    ) -> RevocationOutcome:
        """Store the revocation with its revoked response in one transaction.

        A serial we never heard of is still revoked (the CA knows better than a lost
        write), but it is logged: it means a recording went missing.
        """
        now = whole_seconds(dt.datetime.now(dt.UTC))
        when = whole_seconds(revoked_at) if revoked_at is not None else now
        if when > now + dt.timedelta(minutes=5):
            raise ValueError("revocation time is in the future")
        knowledge = await self.store.knowledge(issuer.db_id, serial)
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
        if self.store.replicas is not None:
            await self.store.replicas.pin(issuer.db_id, serial_key(serial))
        return RevocationOutcome(created=created, signed=signed, revocation=revocation)
