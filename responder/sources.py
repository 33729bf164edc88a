"""The lookup chain: where an answer for one CertID comes from.

As in Let's Encrypt's Boulder responder, one small interface (``Source``) and sources
composed in a chain, cheapest first:

    IssuerFilter -> CacheSource -> StoreSource -> LiveSigningSource

The filter rejects CertIDs for issuers we do not serve before any I/O. The cache answers
from memory; the store reads the pre-signed row; the live signer signs on demand for a
serial the store knows (recorded, revoked, or seen in CT) but holds no fresh response for,
and writes it back. A serial nobody knows raises ``SerialNotFound``; the HTTP layer answers
it ``unauthorized`` (see README: "Unassigned serials").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple, Protocol

from responder.protocol import CertIdRequest
from responder.response_cache import ResponseCache, ServedResponse, cache_key
from responder.store import PresignedStore
from responder.write_back import WriteBack
from signer.issuers import Issuer, IssuerRegistry
from signer.response_builder import CertStatus, SignedResponse, ValidityPolicy, sign_response

log = logging.getLogger(__name__)


class LookupError_(Exception):
    """Base of the reasons a lookup yields no signed answer."""


class UnknownIssuer(LookupError_):
    """The CertID names an issuer we do not answer for."""


class SerialNotFound(LookupError_):
    """No record of this serial anywhere: never answered 'good'."""


class Overloaded(LookupError_):
    """Too many on-demand signatures queued: answer tryLater quickly instead of queueing."""


class Unavailable(LookupError_):
    """A dependency (database, signer) failed; the answer is tryLater, never stale bytes."""


# NamedTuples, not frozen dataclasses: one of each is built per request, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs several times more.
class Query(NamedTuple):
    request: CertIdRequest
    issuer: Issuer


class Answer(NamedTuple):
    response: ServedResponse
    source: str  # "cache", "store", "live": for metrics and logs
    #: what the cache may keep: the nonce-less response (a nonce echo is never cached)
    cacheable: ServedResponse | None = None


class Source(Protocol):
    async def response(self, query: Query) -> Answer:
        """Answer the query or raise a LookupError_ subclass."""
        ...


class IssuerFilter:
    """Head of the chain: map the CertID to an issuer by name AND key hash, or reject."""

    def __init__(self, registry: IssuerRegistry, next_source: Source) -> None:
        self.registry = registry
        self.next = next_source
        self._cache = next_source if isinstance(next_source, CacheSource) else None

    def cached(self, request: CertIdRequest) -> ServedResponse | None:
        """The synchronous head of the chain: the cached answer, or None (then await
        ``response``). Most requests end here, without a coroutine per link."""
        if self._cache is None:
            return None
        issuer = self.registry.for_cert_id(
            request.hash_algorithm, request.issuer_name_hash, request.issuer_key_hash
        )
        if issuer is None:
            return None
        return self._cache.cached(request, issuer)

    async def response(self, request: CertIdRequest) -> Answer:
        issuer = self.registry.for_cert_id(
            request.hash_algorithm, request.issuer_name_hash, request.issuer_key_hash
        )
        if issuer is None:
            raise UnknownIssuer(request.hash_algorithm)
        return await self.next.response(Query(request, issuer))


class CacheSource:
    """In-process response bytes. Pre-signed answers carry no nonce (RFC 5019 lets a
    responder ignore it), so a request with a nonce is answered from here too."""

    def __init__(self, cache: ResponseCache, next_source: Source) -> None:
        self.cache = cache
        self.next = next_source

    def cached(self, request: CertIdRequest, issuer: Issuer) -> ServedResponse | None:
        """The fresh cached answer, if any."""
        entry = self.cache.get(cache_key(issuer.db_id, request.serial, request.hash_algorithm))
        if entry is not None and time.time() < entry.renew_at:
            return entry
        return None

    async def response(self, query: Query) -> Answer:
        req = query.request
        key = cache_key(query.issuer.db_id, req.serial, req.hash_algorithm)
        entry = self.cache.get(key)
        if entry is not None and time.time() < entry.renew_at:
            return Answer(entry, "cache", None)
        answer = await self.next.response(query)
        if answer.cacheable is not None:
            self.cache.put(key, answer.cacheable)
        return answer


class StoreSource:
    """The pre-signed row in PostgreSQL (SHA-1 CertIDs; other hashes are signed live)."""

    def __init__(self, store: PresignedStore, policy: ValidityPolicy, next_source: Source) -> None:
        self.store = store
        self.margin = int(policy.refresh_margin.total_seconds())
        self.next = next_source

    async def response(self, query: Query) -> Answer:
        req = query.request
        if req.hash_algorithm == "sha1":
            try:
                row = await self.store.fetch_response(query.issuer.db_id, req.serial)
            except Exception as exc:
                raise Unavailable(f"store read failed: {type(exc).__name__}") from exc
            if row is not None:
                renew_at = row.next_update - self.margin
                if time.time() < renew_at:
                    served = ServedResponse.build(
                        row.der, row.status, row.this_update, row.next_update, renew_at
                    )
                    return Answer(served, "store", served)
        return await self.next.response(query)


class LiveSigningSource:
    """Sign on demand for a known serial, bounded so overload answers tryLater fast.

    ``queue_limit`` caps the on-demand requests in flight (the store read included):
    beyond it the answer is tryLater at once. The semaphore (``concurrency``) bounds the
    signatures themselves; the database read happens outside it so a slow read does not
    idle the signer. The write-back of what was signed happens after the answer, batched
    (responder/write_back.py), since its failure changes nothing for this request.
    """

    def __init__(
        self,
        store: PresignedStore,
        policy: ValidityPolicy,
        *,
        concurrency: int = 4,
        queue_limit: int = 256,
    ) -> None:
        self.store = store
        self.policy = policy
        self.margin = int(policy.refresh_margin.total_seconds())
        self._semaphore = asyncio.Semaphore(concurrency)
        self._queue_limit = queue_limit
        self._waiting = 0
        self._write_back = WriteBack(store)

    @property
    def waiting(self) -> int:
        return self._waiting

    async def response(self, query: Query) -> Answer:
        if self._waiting >= self._queue_limit:
            raise Overloaded("signing queue full")
        self._waiting += 1
        try:
            return await self._sign(query)
        finally:
            self._waiting -= 1

    async def _sign(self, query: Query) -> Answer:
        req, issuer = query.request, query.issuer
        try:
            knowledge = await self.store.knowledge(issuer.db_id, req.serial)
        except Exception as exc:
            raise Unavailable(f"store read failed: {type(exc).__name__}") from exc
        if not knowledge.known:
            raise SerialNotFound(req.serial)
        status = CertStatus.REVOKED if knowledge.revocation else CertStatus.GOOD
        async with self._semaphore:
            try:
                signed = sign_response(
                    issuer,
                    req.serial,
                    status,
                    self.policy,
                    revocation=knowledge.revocation,
                    hash_algorithm=req.hash_algorithm,
                )
                echo = None
                if req.nonce is not None:
                    echo = sign_response(
                        issuer,
                        req.serial,
                        status,
                        self.policy,
                        revocation=knowledge.revocation,
                        hash_algorithm=req.hash_algorithm,
                        nonce=req.nonce,
                    )
            except Exception as exc:
                log.exception("on-demand signing failed for issuer %s", issuer.name)
                raise Unavailable("signing failed") from exc
        if req.hash_algorithm == "sha1":
            self._write_back.add(issuer.db_id, req.serial, signed)
        served = self._served(signed)
        if echo is not None:
            return Answer(self._served(echo), "live", served)
        return Answer(served, "live", served)

    async def drain(self, timeout: float = 5.0) -> None:
        """Store queued write-backs (bounded), before the pool closes."""
        await self._write_back.drain(timeout)

    def _served(self, signed: SignedResponse) -> ServedResponse:
        return ServedResponse.build(
            signed.der,
            signed.status,
            signed.this_update,
            signed.next_update,
            signed.next_update - self.margin,
        )


def build_chain(
    registry: IssuerRegistry,
    cache: ResponseCache,
    store: PresignedStore,
    policy: ValidityPolicy,
    *,
    signing_concurrency: int,
    signing_queue_limit: int,
) -> tuple[IssuerFilter, LiveSigningSource]:
    """Compose the standard chain; the live source is returned too, for its queue depth."""
    live = LiveSigningSource(
        store, policy, concurrency=signing_concurrency, queue_limit=signing_queue_limit
    )
    chain = IssuerFilter(registry, CacheSource(cache, StoreSource(store, policy, live)))
    return chain, live
