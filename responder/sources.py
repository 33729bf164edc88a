"""The lookup chain: where an answer for one CertID comes from.

As in Let's Encrypt's Boulder responder, one small interface (``Source``) and sources
composed in a chain, cheapest first:

    IssuerFilter -> CacheSource -> StoreSource -> LiveSigningSource

The filter rejects CertIDs for issuers we do not serve before any I/O. The cache answers
from memory; the store reads the pre-signed row and what it knows of the serial (one
batched statement for all the lookups of a moment: responder/store_lookup.py); the live
signer signs on demand for a serial the store knows (recorded, revoked, or seen in CT)
but holds no fresh response for, and writes it back. A serial nobody knows raises
``SerialNotFound``; the HTTP layer answers it ``unauthorized`` (see README: "Unassigned
serials").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol, TypeVar

from responder import metrics
from responder.ct_index_store import record_request_gap
from responder.protocol import CertIdRequest
from responder.response_cache import ResponseCache, ServedResponse, cache_key
from responder.signing_failures import SigningFailureLog
from responder.store import Knowledge, PresignedStore
from responder.store_lookup import QUEUE_LIMIT, BatchedLookup, LookupQueueFull
from responder.write_back import WriteBack
from signer.issuers import Issuer, IssuerRegistry
from signer.presign import PresignedSigner
from signer.response_builder import (
    CertStatus,
    Revocation,
    SignedResponse,
    SigningError,
    ValidityPolicy,
    renewal_point,
    sign_response,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class LookupError_(Exception):
    """Base of the reasons a lookup yields no signed answer."""


class UnknownIssuer(LookupError_):
    """The CertID names an issuer we do not answer for."""


class SerialNotFound(LookupError_):
    """No record of this serial anywhere: never answered 'good'."""


class Retired(SerialNotFound):
    """The certificate expired longer ago than ``expired_retention``: it left the refresh
    cycle, and once its last response passes nextUpdate it is answered ``unauthorized``."""


class Overloaded(LookupError_):
    """Too many on-demand signatures, or store lookups, queued: answer tryLater quickly
    instead of queueing."""


class Unavailable(LookupError_):
    """A dependency (database, signer) failed; the answer is tryLater, never stale bytes."""


# NamedTuples, not frozen dataclasses: one of each is built per request, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs several times more.
class Query(NamedTuple):
    request: CertIdRequest
    issuer: Issuer
    #: what the store knows of the serial, when an earlier source already read it
    #: (StoreSource's batched lookup): the live signer then reads nothing again
    knowledge: Knowledge | None = None


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
        if entry is not None and time.time() < entry.renew_at and self.cache.invalidations_heard:
            return entry
        return None

    async def response(self, query: Query) -> Answer:
        req = query.request
        key = cache_key(query.issuer.db_id, req.serial, req.hash_algorithm)
        entry = self.cache.get(key)
        # not while invalidations are not heard: then the entry may be a "good" that a
        # revocation replaced, and it is only the fallback for a store that cannot answer
        if entry is not None and time.time() < entry.renew_at and self.cache.invalidations_heard:
            return Answer(entry, "cache", None)
        generation = self.cache.generation
        try:
            answer = await self.next.response(query)
        except (Unavailable, Overloaded):
            # Due for renewal, and the store cannot be read (an outage) or is behind: the
            # cached bytes are still valid until nextUpdate, as StoreSource serves a stored
            # row (before, a database outage turned every cached answer into tryLater as it
            # passed its renewal point). Never past nextUpdate, nor once an invalidation
            # (a revocation) has dropped it meanwhile. The same holds while the
            # invalidation listener is away: the store cannot tell, so memory answers.
            if (
                entry is not None
                and self.cache.get(key) is entry
                and time.time() < entry.next_update
            ):
                return Answer(entry, "cache", None)
            raise
        if answer.cacheable is not None and self.cache.generation == generation:
            self.cache.put(key, answer.cacheable)
        return answer


class StoreSource:
    """The pre-signed row in PostgreSQL (SHA-1 CertIDs; other hashes are signed live).

    One batched read (responder/store_lookup.py) per SHA-1 request gives both the row and
    what the store knows of the serial: an unknown serial ends here, and the live signer
    gets the knowledge with the query instead of reading it again. A CertID of another
    hash goes on at once, as before: the live signer makes its one batched read inside
    its queue (so its queue limit still counts those requests while they read).
    """

    def __init__(
        self,
        store: PresignedStore,
        policy: ValidityPolicy,
        next_source: Source,
        lookup: BatchedLookup | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.next = next_source
        self.lookup = lookup if lookup is not None else BatchedLookup(store)

    async def response(self, query: Query) -> Answer:
        req, issuer = query.request, query.issuer
        if req.hash_algorithm != "sha1":
            return await self.next.response(query)
        try:
            found = await self.lookup.get(issuer.db_id, req.serial)
        except LookupQueueFull as exc:
            raise Overloaded(str(exc)) from exc
        except Exception as exc:
            raise Unavailable(f"store read failed: {type(exc).__name__}") from exc
        row, knowledge = found
        if row is None:
            if not knowledge.known:
                raise SerialNotFound(req.serial)
            return await self.next.response(Query(req, issuer, knowledge))
        renew_at = renewal_point(row.this_update, row.next_update, self.policy)
        served = ServedResponse.build(
            row.der, row.status, row.this_update, row.next_update, renew_at
        )
        if time.time() < renew_at:
            return Answer(served, "store", served)
        try:
            return await self.next.response(Query(req, issuer, knowledge))
        except (Unavailable, Overloaded, Retired):
            # Due for renewal but re-signing failed (or is not wanted): the stored bytes
            # are still valid until nextUpdate, so they are better than tryLater. Past
            # nextUpdate they are never served (the caller answers tryLater/unauthorized).
            if time.time() < row.next_update:
                return Answer(served, "store")
            raise


class LiveSigningSource:
    """Sign on demand for a known serial, bounded so overload answers tryLater fast.

    ``queue_limit`` caps the on-demand requests in flight (the store read included, when
    the query does not carry the knowledge): beyond it the answer is tryLater at once. The
    semaphore (``concurrency``) bounds the signatures made at once: a key in memory signs
    synchronously in the event loop (one at a time, it never waits), a token key in a
    thread (``_run_signing``), so with a token at most ``concurrency`` PKCS#11 round trips
    of this worker are under way and the rest wait their turn. The read is one ``lookup.get``
    (batched with every other lookup of the moment; ``store.knowledge`` without a
    lookup). A SHA-1 query carries the knowledge from StoreSource's lookup: nothing is read
    here, and the request yields once after taking its place in the queue, so the
    requests made ready together (one lookup batch) are counted before any signs: that is
    the queue an overload fills, and what it answers tryLater. The write-back of what was
    signed happens after the answer, batched (responder/write_back.py), since its failure
    changes nothing for this request.
    """

    def __init__(
        self,
        store: PresignedStore,
        policy: ValidityPolicy,
        *,
        concurrency: int = 4,
        queue_limit: int = 256,
        expired_retention: dt.timedelta | None = None,
        lookup: BatchedLookup | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.expired_retention = expired_retention
        self.lookup = lookup
        self._semaphore = asyncio.Semaphore(concurrency)
        self._queue_limit = queue_limit
        self._waiting = 0
        self._write_back = WriteBack(store)
        self._presigner = PresignedSigner(policy)
        self._failures = SigningFailureLog()

    @property
    def waiting(self) -> int:
        return self._waiting

    async def response(self, query: Query) -> Answer:
        if self._waiting >= self._queue_limit:
            raise Overloaded("signing queue full")
        self._waiting += 1
        try:
            if query.knowledge is not None:
                # let every request readied by the same lookup batch take its place first
                await asyncio.sleep(0)
            return await self._sign(query)
        finally:
            self._waiting -= 1

    async def _sign(self, query: Query) -> Answer:
        req, issuer, knowledge = query.request, query.issuer, query.knowledge
        if knowledge is None:  # not a SHA-1 CertID, or no StoreSource in front
            try:
                if self.lookup is not None:
                    found = await self.lookup.get(issuer.db_id, req.serial, want_response=False)
                    knowledge = found.knowledge
                else:
                    knowledge = await self.store.knowledge(issuer.db_id, req.serial)
            except LookupQueueFull as exc:
                raise Overloaded(str(exc)) from exc
            except Exception as exc:
                raise Unavailable(f"store read failed: {type(exc).__name__}") from exc
        if not knowledge.known:
            raise SerialNotFound(req.serial)
        self._check_retention(knowledge, req.serial)
        status = CertStatus.REVOKED if knowledge.revocation else CertStatus.GOOD
        async with self._semaphore:
            try:
                signed, echo = await self._run_signing(
                    issuer,
                    functools.partial(self._signatures, issuer, req, status, knowledge.revocation),
                )
            except Exception as exc:
                # one line per outage, not a traceback per request (a SigningError is a
                # refusal whose message says what to fix; anything else is a bug)
                expected = isinstance(exc, SigningError)
                self._failures.report(issuer.name, exc, expected=expected)
                raise Unavailable("signing failed") from exc
        if knowledge.ct_only and not knowledge.has_response:
            # a coverage gap is stored and recorded before the answer, not batched
            await self._coverage_gap(query, signed, knowledge.revocation)
        elif req.hash_algorithm == "sha1":
            self._write_back.add(issuer.db_id, req.serial, signed)
        served = self._served(signed)
        if echo is not None:
            return Answer(self._served(echo), "live", served)
        return Answer(served, "live", served)

    def _signatures(
        self,
        issuer: Issuer,
        req: CertIdRequest,
        status: CertStatus,
        revocation: Revocation | None,
    ) -> tuple[SignedResponse, SignedResponse | None]:
        """The response to store and cache, and the nonce echo for this client, if any."""
        sign = functools.partial(
            sign_response,
            issuer,
            req.serial,
            status,
            self.policy,
            revocation=revocation,
            hash_algorithm=req.hash_algorithm,
        )
        if status is CertStatus.GOOD and req.hash_algorithm == "sha1":
            # the common case, through the verified template (signer/presign.py):
            # the same bytes as the builder's, several times cheaper
            signed = self._presigner.sign_good(issuer, req.serial)
        else:
            signed = sign()
        # the stored/cached form has no nonce; the echo goes to this client only
        echo = (
            sign(nonce=req.nonce, nonce_wrapped=req.nonce_wrapped)
            if req.nonce is not None
            else None
        )
        return signed, echo

    async def _run_signing(self, issuer: Issuer, signing: Callable[[], T]) -> T:
        """Sign in the event loop with a key in memory (a P-256 signature is ~31 µs, less
        than a thread hop), in a thread with a token key: a PKCS#11 round trip must not
        hold up the answers from memory meanwhile. ``signing_concurrency`` bounds those
        threads per worker (the semaphore around the callers)."""
        if issuer.token_signed:
            return await asyncio.to_thread(signing)
        return signing()

    def _check_retention(self, knowledge: Knowledge, serial: int) -> None:
        """Refuse to sign for a certificate expired beyond the retention (docs/deploy.md)."""
        if self.expired_retention is None or knowledge.not_after is None:
            return
        if knowledge.not_after + self.expired_retention < dt.datetime.now(dt.UTC):
            raise Retired(serial)

    async def drain(self, timeout: float = 5.0) -> None:
        """Store queued write-backs (bounded), before the pool closes."""
        await self._write_back.drain(timeout)

    def _served(self, signed: SignedResponse) -> ServedResponse:
        return ServedResponse.build(
            signed.der,
            signed.status,
            signed.this_update,
            signed.next_update,
            renewal_point(signed.this_update, signed.next_update, self.policy),
        )

    async def _store_now(self, issuer: Issuer, serial: int, signed: SignedResponse) -> bool:
        """Store what we signed at once (a coverage gap's repair), reporting success."""
        try:
            await self.store.store_responses([(issuer.db_id, serial, signed)])
        except Exception:
            log.warning("write-back of on-demand response failed (issuer %s)", issuer.name)
            return False
        return True

    async def _coverage_gap(
        self, query: Query, signed: SignedResponse, revocation: Revocation | None
    ) -> None:
        """A serial known only from CT had no response: store one (SHA-1, the pre-signed
        form) and keep the gap for the operator; counted once per serial."""
        req, issuer = query.request, query.issuer
        if req.hash_algorithm != "sha1":
            async with self._semaphore:
                signed = await self._run_signing(
                    issuer,
                    functools.partial(
                        sign_response,
                        issuer,
                        req.serial,
                        signed.status,
                        self.policy,
                        revocation=revocation,
                    ),
                )
        stored = await self._store_now(issuer, req.serial, signed)
        try:
            gap = await record_request_gap(
                self.store.pool, issuer.db_id, req.serial, repaired=stored
            )
        except Exception:
            log.exception("could not record the coverage gap of issuer %s", issuer.name)
            return
        if gap is not None:
            metrics.coverage_gaps_total.labels(issuer.name).inc()
            log.error(
                "coverage gap: serial %s of issuer %s is in CT (log %s, leaf %s) but had no "
                "response; signed on demand%s",
                format(req.serial, "x"),
                issuer.name,
                gap.log_name,
                gap.leaf_index,
                "" if stored else " (storing it failed)",
            )


def build_chain(
    registry: IssuerRegistry,
    cache: ResponseCache,
    store: PresignedStore,
    policy: ValidityPolicy,
    *,
    signing_concurrency: int,
    signing_queue_limit: int,
    expired_retention: dt.timedelta | None = None,
    store_lookup_queue_limit: int = QUEUE_LIMIT,
) -> tuple[IssuerFilter, LiveSigningSource]:
    """Compose the standard chain; the live source is returned too, for its queue depths.
    The store and live sources share one BatchedLookup, so their reads join one batch."""
    lookup = BatchedLookup(store, queue_limit=store_lookup_queue_limit)
    live = LiveSigningSource(
        store,
        policy,
        concurrency=signing_concurrency,
        queue_limit=signing_queue_limit,
        expired_retention=expired_retention,
        lookup=lookup,
    )
    chain = IssuerFilter(registry, CacheSource(cache, StoreSource(store, policy, live, lookup)))
    return chain, live
