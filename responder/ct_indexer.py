"""The CT follower runner: logs -> verified batches -> PostgreSQL index -> repaired gaps.

For each configured log, ``LogFollower`` (``responder.ct``) yields verified batches; each
batch's index rows, its coverage gaps and the log's new position commit in one
transaction (``CTIndexStore.commit_batch``). Right after, every gap (a newly indexed
serial with no stored response: the CA's own write was lost or bypassed) is signed
(good, or revoked if a revocation is recorded), stored and marked repaired, so the
answer is authoritative within seconds of the log's publication, without waiting for a
relying party to ask. Gaps are counted (``coverage_gaps_total{issuer}``), logged at ERROR
with serial, log and leaf index, and kept in ``coverage_gaps``.

A log that fails verification (bad signature, entry not matching its hash, rollback) is
never advanced: the error is logged and stored (``ct-status`` shows it) and the same
range is tried again next poll. Fetch failures (429/5xx after retries) are the same,
at warning level.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import httpx

from responder import metrics
from responder.config import Config, ConfigError, CTLogConfig
from responder.ct import (
    Batch,
    CTError,
    FetchError,
    IssuerSet,
    LogConfig,
    LogFollower,
    LogKey,
    RetryPolicy,
    VerificationError,
)
from responder.ct import Issuer as CTIssuer
from responder.ct.client import new_http_client
from responder.ct_index_store import CTIndexStore, Gap, IndexRow, PositionConflict
from signer.issuers import Issuer, IssuerConfigError, IssuerRegistry
from signer.response_builder import (
    CertStatus,
    SignedResponse,
    SigningError,
    ValidityPolicy,
    sign_response,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: failures of the database that a later poll may not meet again
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
#: what one poll of one log is expected to fail with (anything else is a bug: it is
#: stored as the log's error too, and its traceback logged once)
POLL_ERRORS: tuple[type[BaseException], ...] = (
    CTError,
    PositionConflict,
    httpx.HTTPError,
    *DATABASE_ERRORS,
)
#: the latest CT timestamp ``ct_index.logged_at`` holds (9999-12-31T23:59:59.999Z); a
#: log may sign any uint64
MAX_LOGGED_AT_MS = 253_402_300_799_999

#: gaps that may fail to sign in one repair pass before it stops (the rest of the pass
#: would only fail the same way; the skip list stays small)
MAX_UNSIGNED_PER_PASS = 4096

#: gaps signed per repair transaction (bounds memory and the transaction's size)
REPAIR_CHUNK = 256


@dataclass
class PollResult:
    """What one poll of one log did (for ``ct-follow --once`` and tests)."""

    log: str
    batches: int = 0
    scanned: int = 0
    indexed: int = 0
    gaps: int = 0
    repaired: int = 0
    malformed: int = 0
    suspicious: int = 0
    next_index: int = 0
    tree_size: int = 0
    lag_seconds: float | None = None
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _FollowedLog:
    config: CTLogConfig
    key: LogKey
    db_id: int = -1
    follower: LogFollower | None = None
    #: type of the last poll's unexpected exception, whose traceback was logged: while
    #: the same type repeats, one line per poll (a serve loop must not spam tracebacks)
    unexpected: type[BaseException] | None = None


class CTIndexer:
    """Follows every configured log into the index and repairs gaps; one per process."""

    def __init__(
        self,
        logs: Sequence[CTLogConfig],
        registry: IssuerRegistry,
        pool: asyncpg.Pool,
        policy: ValidityPolicy,
        *,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
        expired_retention: dt.timedelta | None = None,
    ) -> None:
        self.registry = registry
        #: with a retention, a serial whose logged notAfter is further in the past is never
        #: a gap: it is retired (docs/deploy.md, "Expired certificates: retention")
        self.store = CTIndexStore(pool, expired_retention=expired_retention)
        self.policy = policy
        self.retry = retry or RetryPolicy()
        #: one client for every log, built in start() unless given (see new_http_client);
        #: a follower rebuilt after an error reuses it instead of building its own
        self.http = http
        self._own_http = http is None
        self.issuer_set = IssuerSet(
            CTIssuer.from_certificate(i.certificate) for i in registry.issuers
        )
        self.logs: list[_FollowedLog] = []
        for i, cfg in enumerate(logs):
            try:
                key = LogKey(cfg.public_key)
            except ValueError as exc:
                raise ConfigError(f"ct_logs[{i}] ({cfg.name}).public_key: {exc}") from exc
            if any(f.key.log_id == key.log_id for f in self.logs):
                raise ConfigError(
                    f"ct_logs[{i}] ({cfg.name}): another configured log has the same key "
                    "(a log is identified by its key: configure it once)"
                )
            self.logs.append(_FollowedLog(cfg, key))
        self._started = False
        self._repairing = asyncio.Lock()
        #: gaps whose signing failed, already logged at ERROR (bounded)
        self._unsignable: set[tuple[int, int]] = set()

    @classmethod
    def from_config(cls, config: Config, registry: IssuerRegistry, pool: asyncpg.Pool) -> CTIndexer:
        """The indexer ``serve`` and ``ct-follow`` run: the configured logs, policy and
        retention (one place, so the two never follow with different rules)."""
        return cls(
            config.ct_logs,
            registry,
            pool,
            config.policy,
            expired_retention=config.expired_retention,
        )

    async def start(self) -> None:
        """Create or find each log's row (the issuers must be registered already)."""
        if self.http is None:
            self.http = await asyncio.to_thread(new_http_client, self.retry)
        for followed in self.logs:
            pos = await self.store.ensure_log(
                followed.key.log_id, followed.config.name, followed.config.url
            )
            followed.db_id = pos.db_id
        self._started = True

    async def aclose(self) -> None:
        for followed in self.logs:
            await self._drop_follower(followed)
        if self._own_http and self.http is not None:
            http, self.http = self.http, None
            self._started = False  # a later run_once/run builds a new client in start()
            await http.aclose()

    # --- one poll ---------------------------------------------------------------

    async def run_once(self) -> list[PollResult]:
        """Catch every log up to its current head once (and repair pending gaps)."""
        if not self._started:
            await self.start()
        results = [await self.poll(followed) for followed in self.logs]
        await self.repair_pending()
        return results

    async def poll(self, followed: _FollowedLog) -> PollResult:
        """Catch one log up; commit batch by batch; never raises for a log's fault.

        An unexpected exception (a bug, or a hostile log finding one) is stored as the
        log's error like any other: logged with its traceback once, then one line per
        poll while it repeats, and the other logs are still polled.
        """
        name = followed.config.name
        result = PollResult(name)
        follower: LogFollower | None = None
        try:
            follower = await self._follower(followed)

            async def commit(batch: Batch) -> None:
                await self._commit(followed, batch, result)

            await pipelined(follower.poll_once(), commit)
            result.next_index = follower.state.next_index
            result.tree_size = follower.state.head_size
            await self.store.record_poll_ok(followed.db_id, result.tree_size)
        except Exception as exc:
            # The follower's in-memory state may be ahead of what committed: rebuild it
            # from the stored position next time.
            head = follower.verified_head if follower is not None else None
            if follower is not None:
                result.tree_size = max(
                    follower.state.head_size, head.tree_size if head is not None else 0
                )
            await self._drop_follower(followed)
            result.error = " ".join(f"{type(exc).__name__}: {exc}".split())
            if isinstance(exc, VerificationError):
                log.error("CT log %s failed verification, not advancing: %s", name, result.error)
            elif isinstance(exc, (FetchError, PositionConflict)):
                log.warning("CT log %s: %s (will retry)", name, result.error)
            elif isinstance(exc, POLL_ERRORS) or followed.unexpected is type(exc):
                log.error("CT log %s: %s", name, result.error)
            else:
                log.exception("CT log %s: unexpected failure (will retry)", name)
            followed.unexpected = None if isinstance(exc, POLL_ERRORS) else type(exc)
            with contextlib.suppress(*DATABASE_ERRORS):
                await self.store.record_log_error(
                    followed.db_id, result.error, head.tree_size if head is not None else None
                )
                position = await self.store.position(followed.db_id)
                result.next_index = position.next_index
            return result
        followed.unexpected = None
        metrics.ct_log_position.labels(name).set(result.next_index)
        return result

    async def _follower(self, followed: _FollowedLog) -> LogFollower:
        if followed.follower is None:
            cfg = followed.config
            position = await self.store.position(followed.db_id)
            followed.follower = LogFollower(
                LogConfig(
                    url=cfg.url,
                    kind=cfg.kind,  # type: ignore[arg-type]
                    public_key=cfg.public_key,
                    issuers=self.issuer_set,
                    origin=cfg.origin,
                    batch_size=cfg.batch_size,
                    retry=self.retry,
                    start_index=cfg.start_index,
                ),
                position.state,
                http=self.http,
            )
        return followed.follower

    async def _drop_follower(self, followed: _FollowedLog) -> None:
        if followed.follower is not None:
            follower, followed.follower = followed.follower, None
            with contextlib.suppress(Exception):
                await follower.aclose()

    async def _commit(self, followed: _FollowedLog, batch: Batch, result: PollResult) -> None:
        name = followed.config.name
        rows: list[IndexRow] = []
        clamped = 0
        for entry in batch.entries:
            issuer = self.registry.for_spki_sha256(entry.issuer_key_hash)
            if issuer is None:  # cannot happen: the filter only passes our issuers
                continue
            logged_at_ms = entry.timestamp_ms
            if logged_at_ms > MAX_LOGGED_AT_MS:
                # A log-signed uint64 the database cannot hold: the serial is ours and must
                # be indexed all the same (refusing the batch stopped the log for good).
                logged_at_ms = MAX_LOGGED_AT_MS
                clamped += 1
            rows.append(
                IndexRow(
                    issuer.db_id,
                    entry.serial,
                    entry.leaf_index,
                    entry.kind,
                    logged_at_ms,
                    entry.not_after,
                )
            )
        if clamped:
            log.warning(
                "CT log %s: %d entries of ours carry a timestamp beyond year 9999; "
                "indexed with logged_at 9999-12-31",
                name,
                clamped,
            )
        for bad in batch.malformed:
            log.error(
                "CT log %s leaf %d may be one of ours but does not parse (not indexed): %s",
                name,
                bad.leaf_index,
                bad.reason,
            )
        mismatched = [e for e in batch.entries if e.mismatch is not None]
        if mismatched:
            # our key signed these precertificates, the log paired them with another
            # TBSCertificate: indexed by what we signed; the log misbehaves (one line)
            first_m = mismatched[0]
            log.error(
                "CT log %s: %d precertificates our issuer signed were logged with a "
                "TBSCertificate that differs from them (indexed by the precertificate's "
                "serial); first: leaf %d, serial %x: %s",
                name,
                len(mismatched),
                first_m.leaf_index,
                first_m.serial,
                first_m.mismatch,
            )
            metrics.ct_suspicious_entries_total.labels(name).inc(len(mismatched))
            result.suspicious += len(mismatched)
        if batch.suspicious:
            # one line per batch, not per entry: a hostile log may send thousands
            first = batch.suspicious[0]
            log.warning(
                "CT log %s: %d entries in leaves [%d, %d) name our issuer_key_hash but our "
                "issuer did not sign them (not indexed); first: leaf %d: %s",
                name,
                len(batch.suspicious),
                batch.start,
                batch.end,
                first.leaf_index,
                first.reason,
            )
            metrics.ct_suspicious_entries_total.labels(name).inc(len(batch.suspicious))
        outcome = await self.store.commit_batch(
            followed.db_id,
            name,
            batch.start,
            rows,
            batch.new_state.to_json(),
            batch.end,
            batch.tree_size,
        )
        result.batches += 1
        result.scanned += batch.scanned
        result.indexed += outcome.new_serials
        result.malformed += len(batch.malformed)
        result.suspicious += len(batch.suspicious)
        metrics.ct_entries_indexed_total.labels(name).inc(outcome.new_serials)
        metrics.ct_log_position.labels(name).set(batch.end)
        for gap in outcome.gaps:
            issuer = self.registry.by_db_id(gap.issuer_id)
            issuer_name = issuer.name if issuer else str(gap.issuer_id)
            metrics.coverage_gaps_total.labels(issuer_name).inc()
            log.error(
                "coverage gap: serial %s of issuer %s appeared in CT (log %s, leaf %d) with no "
                "stored response; signing it now",
                format(gap.serial, "x"),
                issuer_name,
                name,
                gap.leaf_index,
            )
        result.gaps += len(outcome.gaps)
        if outcome.gaps:
            result.repaired += await self.repair_pending()
        if rows:
            newest = max(r.logged_at_ms for r in rows)
            lag = max(0.0, time.time() - newest / 1000)
            result.lag_seconds = lag
            metrics.ct_lag_seconds.labels(name).set(lag)
            await self.store.record_lag(followed.db_id, lag)

    # --- gap repair -------------------------------------------------------------

    async def repair_pending(self) -> int:
        """Sign and store a response for every unrepaired gap of our issuers."""
        async with self._repairing:
            return await self._repair_pending()

    async def _repair_pending(self) -> int:
        # an issuer configured without any signing key cannot repair anything: its gaps
        # stay open (and counted) without being read and refused chunk after chunk
        issuer_ids = [i.db_id for i in self.registry.issuers if i.responders]
        repaired = 0
        #: gaps that could not be signed in this pass: left out of the next chunks, so
        #: they never starve the gaps behind them (they are tried again next poll)
        unsigned: list[tuple[int, int]] = []
        while True:
            gaps = await self.store.unrepaired_gaps(issuer_ids, REPAIR_CHUNK, skip=unsigned)
            if not gaps:
                return repaired
            # Signing a chunk takes up to ~0.5 s (RSA): off the event loop, so a follower
            # inside `serve` does not stall the OCSP hot path during a burst of gaps.
            signed = await asyncio.to_thread(self._sign_all, gaps)
            if signed:
                await self.store.store_repairs(signed)
                repaired += len(signed)
            done = {(g.issuer_id, g.serial) for g, _ in signed}
            unsigned += [
                (g.issuer_id, g.serial) for g in gaps if (g.issuer_id, g.serial) not in done
            ]
            if len(unsigned) >= MAX_UNSIGNED_PER_PASS:
                return repaired  # something is wrong with signing: the next poll retries

    def _sign_all(self, gaps: Sequence[Gap]) -> list[tuple[Gap, SignedResponse]]:
        return [s for s in (self._sign(g) for g in gaps) if s is not None]

    def _sign(self, gap: Gap) -> tuple[Gap, SignedResponse] | None:
        issuer: Issuer | None = self.registry.by_db_id(gap.issuer_id)
        if issuer is None:
            return None
        status = CertStatus.REVOKED if gap.revocation else CertStatus.GOOD
        try:
            return gap, sign_response(
                issuer, gap.serial, status, self.policy, revocation=gap.revocation
            )
        except (IssuerConfigError, SigningError, ValueError) as exc:
            # once per gap and process at ERROR; every pass retries it, quietly
            first = (gap.issuer_id, gap.serial) not in self._unsignable
            if first and len(self._unsignable) < MAX_UNSIGNED_PER_PASS:
                self._unsignable.add((gap.issuer_id, gap.serial))
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "coverage gap of issuer %s serial %s cannot be signed now: %s",
                issuer.name,
                format(gap.serial, "x")[:64],
                exc,
            )
            return None

    # --- running ----------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Follow every log at its poll interval until ``stop`` is set (or cancelled)."""
        stop = stop or asyncio.Event()
        # The logs' rows cannot be registered while the database is down (a restart or
        # failover as `serve` starts): retry at the poll interval instead of ending the
        # follower for good, which left every later lost recording `unauthorized`.
        retry = min((f.config.poll_interval.total_seconds() for f in self.logs), default=10.0)
        try:  # start() builds the shared HTTP client: closed however this ends
            while not self._started and not stop.is_set():
                try:
                    await self.start()
                except DATABASE_ERRORS as exc:
                    log.warning("CT follower cannot register its logs yet (will retry): %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=retry)
            await asyncio.gather(*(self._loop(f, stop) for f in self.logs))
        finally:
            await self.aclose()

    async def _loop(self, followed: _FollowedLog, stop: asyncio.Event) -> None:
        interval = followed.config.poll_interval.total_seconds()
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.poll(followed)
                await self.repair_pending()
            except DATABASE_ERRORS as exc:
                log.warning("gap repair failed (will retry): %s", exc)
            except Exception:  # a bug must not stop following for good: keep trying
                log.exception("CT log %s: unexpected failure (will retry)", followed.config.name)
                await self._drop_follower(followed)
            wait = max(0.0, interval - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)


async def pipelined(batches: AsyncIterator[T], commit: Callable[[T], Awaitable[None]]) -> None:
    """Commit batches in order while the next one is fetched and parsed.

    The fetch/parse side runs in a task one batch ahead (so at most two batches are in
    memory), overlapping its CPU work with the database's. Batches are committed strictly
    in order; an error on either side stops both. If fetching fails, the batches already
    handed over are committed first (they were verified), then the error is raised.
    """
    queue: asyncio.Queue[T | None] = asyncio.Queue(maxsize=1)

    async def produce() -> None:
        try:
            async for batch in batches:
                await queue.put(batch)
        except asyncio.CancelledError:
            raise
        except BaseException:
            await queue.put(None)  # let the committer finish what was handed over
            raise
        await queue.put(None)

    producer = asyncio.create_task(produce())
    try:
        while (item := await queue.get()) is not None:
            await commit(item)
    except BaseException:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await producer
        raise
    await producer  # re-raises a fetch/verification error


class BackgroundFollower:
    """The follower as a task inside ``serve`` (``ct_follow_in_serve = true``)."""

    def __init__(self, indexer: CTIndexer) -> None:
        self.indexer = indexer
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ct-follower")

    async def _run(self) -> None:
        try:
            await self.indexer.run(self._stop)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the CT follower stopped; serving continues without it")

    async def stop(self) -> None:
        """Cancel the follower. Safe at any point: a batch's transaction either committed
        (with its position) or rolls back and is fetched again after the restart."""
        self._stop.set()
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
