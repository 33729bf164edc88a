"""Store lookups of the hot path, coalesced: one statement answers a whole batch.

A cache miss needs, for one (issuer, serial), the pre-signed ``responses`` row and what the
store knows of the serial (recorded, seen in CT, revoked: ``Knowledge``). Asked one request
at a time that is one or two round trips each, and each costs more client and PostgreSQL
CPU than the signature it may lead to. ``BatchedLookup.get`` instead queues the key; the
first ``get`` of an event-loop iteration schedules a flush with ``loop.call_soon``, so every
key asked in the same iteration joins one statement:

    FROM generate_subscripts($2::bytea[], 1) AS q(i)   -- $1: issuer ids, $2: serials
    LEFT JOIN LATERAL (one primary-key probe) for responses, certificates, revocations,
    ct_index

(primary-key index probes in a nested loop). A lone request waits no timer: its flush runs
on the next loop iteration. A batch holds at most ``max_batch`` distinct keys; a key asked
twice is queried once. Up to ``max_in_flight`` batches run at once, each on its own pool
connection; while that many run, new keys wait and join the next batch, sent as soon as
one finishes: under load batches grow instead of statements multiplying. At most
``queue_limit`` distinct keys wait so: a new key beyond that raises ``LookupQueueFull`` at
once (the chain answers tryLater), so when the database falls behind the requests it
cannot answer soon are refused quickly instead of queueing without end.

If the statement fails, every waiter of that batch gets the exception (the chain answers
tryLater). A waiter that is cancelled only drops its own future; the batch goes on.

No waiter waits longer than ``wait_deadline`` (3 s): a watchdog, armed while anything
waits, fails older waiters with ``LookupTimedOut`` (tryLater). A database that hangs
(stalled storage, a partition that drops packets) is not an error the statement sees:
asyncpg gives up after the pool's 10 s command timeout and then waits about as long again
for its cancel request, so every miss was answered tryLater after ~20 s, long after the
relying party had given up. The watchdog costs a deque append (of a weak reference) per
request, no timer each.

With read replicas the rules of ``PresignedStore._read`` hold per key: ``ReplicaSet.pick``
says whether a replica may answer for it (keys are grouped by replica; None: primary);
a replica's answer is final only when it is one the single-row reads would have taken
from it (the serial is known, and the response row is there when a waiter needs the row);
otherwise, or when the replica read fails, the key is asked of the primary.
docs/performance.md ("Batched store lookups") has the why.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from typing import NamedTuple

import asyncpg

from responder import metrics
from responder.store import (
    Knowledge,
    PresignedStore,
    StoredResponse,
    knowledge_from_row,
    serial_key,
    stored_response_from_row,
)

log = logging.getLogger(__name__)

#: the most distinct keys in one statement: the plan stays index probes, the reply small
MAX_BATCH = 256

#: batches running at once: while that many run, new keys gather into the next batch, so
#: under load batches grow instead of statements multiplying; the rest of the pool stays
#: free for writes (write-back, recording, health checks)
MAX_IN_FLIGHT = 4

#: distinct keys waiting for a batch (asked, not yet sent) beyond which a new key is refused:
#: 16 full batches, i.e. four rounds of MAX_IN_FLIGHT; a key already waiting is never
#: refused (its request joins the waiters at no cost to the database)
QUEUE_LIMIT = 4096

#: the longest a request waits for its lookup before it is answered tryLater (seconds)
WAIT_DEADLINE = 3.0

#: The primary-key condition of one table for key number q.i of the batch.
_KEY_I = "issuer_id = ($1::smallint[])[q.i] AND serial = ($2::bytea[])[q.i]"


#: One row per requested key, i being its place in the arrays. Each table is read through
#: a LATERAL subquery with LIMIT 1 (the primary key allows one row anyway): a subquery with
#: a LIMIT is not flattened into a join, so the plan stays one primary-key probe per key
#: and table (nested loop, index scans) whatever the statistics. Without it the planner
#: chose, for a batch of 256, hash joins over sequential scans of tables of 20,000 rows (an
#: EXISTS became a hashed subplan likewise). The keys are walked with generate_subscripts,
#: not unnest: in a custom plan unnest's row estimate is the array's length, so the
#: generic plan (estimated for 10) always looked dearer, PostgreSQL never settled on it,
#: and every execution was planned again (~150 us of backend CPU, more than the whole
#: execution); generate_subscripts has the same estimate in both, so after five
#: executions the prepared statement runs its generic plan.
#: tests/test_store_lookup.py checks the plans.
def lookup_statement(ct_not_after: bool) -> str:
    """The statement, for a schema with ``ct_index.not_after`` (migration 0005, expand-
    only) or without: with it, a serial known only from CT gets its logged notAfter (the
    retention rule applies to it too)."""
    not_after = "coalesce(c.not_after, t.not_after)" if ct_not_after else "c.not_after"
    ct_columns = "true AS seen, not_after" if ct_not_after else "true AS seen"
    return (
        "SELECT q.i, r.der, r.status, r.this_update, r.next_update, "
        "       r.der IS NOT NULL AS has_response, "
        f"       {not_after} AS not_after, c.not_after IS NOT NULL AS recorded, "
        "       t.seen IS NOT NULL AS in_ct, "
        "       v.revoked_at, v.reason "
        "FROM generate_subscripts($2::bytea[], 1) AS q(i) "
        "LEFT JOIN LATERAL (SELECT der, status, this_update, next_update FROM responses "
        f"                   WHERE {_KEY_I} LIMIT 1) r ON true "
        "LEFT JOIN LATERAL (SELECT not_after FROM certificates "
        f"                   WHERE {_KEY_I} LIMIT 1) c ON true "
        "LEFT JOIN LATERAL (SELECT revoked_at, reason FROM revocations "
        f"                   WHERE {_KEY_I} LIMIT 1) v ON true "
        f"LEFT JOIN LATERAL (SELECT {ct_columns} FROM ct_index "
        f"                   WHERE {_KEY_I} LIMIT 1) t ON true"
    )


LOOKUP_STATEMENTS = {flag: lookup_statement(flag) for flag in (False, True)}

Key = tuple[int, bytes]  # (issuer id, serial key)
Waiters = dict[Key, list["asyncio.Future[Lookup]"]]


class Lookup(NamedTuple):
    """Everything the chain needs about one serial, from one statement."""

    #: the pre-signed row (SHA-1 CertID), or None
    response: StoredResponse | None
    knowledge: Knowledge


class LookupQueueFull(Exception):
    """``queue_limit`` distinct keys already wait for a batch: the database is behind, and
    this request is refused at once (tryLater) instead of waiting at the end of the line."""


class LookupInterrupted(Exception):
    """The batch ended (its task was cancelled, e.g. at shutdown) before answering."""


class LookupTimedOut(Exception):
    """The lookup did not answer within ``wait_deadline`` (the database hangs or is far
    behind): the request is answered tryLater; the statement itself goes on."""


def lookup_from_row(row: asyncpg.Record) -> Lookup:
    """One row of ``lookup_statement`` as what ``fetch_response`` + ``knowledge`` give."""
    has_response = bool(row["has_response"])
    response = stored_response_from_row(row) if has_response else None
    return Lookup(response, knowledge_from_row(row, has_response=has_response))


class BatchedLookup:
    """Coalesces concurrent store lookups into one statement per event-loop iteration."""

    def __init__(
        self,
        store: PresignedStore,
        *,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
        queue_limit: int = QUEUE_LIMIT,
        wait_deadline: float = WAIT_DEADLINE,
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.queue_limit = queue_limit
        self.wait_deadline = wait_deadline
        #: (when asked, weak reference to its future) of every waiter, oldest first, for
        #: the watchdog (weak: an answered future and its result are not kept for it)
        self._asked: collections.deque[tuple[float, weakref.ref[asyncio.Future[Lookup]]]] = (
            collections.deque()
        )
        self._watchdog: asyncio.TimerHandle | None = None
        #: statements sent (replica and primary, failed ones included), batches formed,
        #: keys asked: for tests and for judging the batching
        self.statements = 0
        self.batches = 0
        self.keys = 0
        self._pending: Waiters = {}
        #: pending keys for which some waiter uses the response row
        self._want_response: set[Key] = set()
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, issuer_id: int, serial: int, *, want_response: bool = True) -> Lookup:
        """The stored response and knowledge of one serial, from the next batch.

        ``want_response`` False (a CertID the stored row cannot answer, i.e. not SHA-1)
        lets a replica's answer stand without the row, as ``knowledge`` alone would.
        Raises ``LookupQueueFull`` at once when ``queue_limit`` other keys already wait,
        and what the statement raised (asyncpg/OS errors) when the batch fails."""
        loop = asyncio.get_running_loop()
        key = (issuer_id, serial_key(serial))
        waiters = self._pending.get(key)
        if waiters is None and len(self._pending) >= self.queue_limit:
            metrics.store_lookups_refused_total.inc()
            raise LookupQueueFull(f"{len(self._pending)} keys wait for the store")
        future: asyncio.Future[Lookup] = loop.create_future()
        if waiters is None:
            self._pending[key] = [future]
        else:
            waiters.append(future)
        if want_response:
            self._want_response.add(key)
        if not self._scheduled and self._in_flight < self.max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush, loop)
        self._asked.append((loop.time(), weakref.ref(future)))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.wait_deadline / 3, self._expire, loop)
        return await future

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the waiters asked more than ``wait_deadline`` ago and still unanswered;
        runs a few times per deadline while anything waits."""
        self._watchdog = None
        too_old = loop.time() - self.wait_deadline
        asked = self._asked
        timed_out = 0
        while asked and asked[0][0] <= too_old:
            future = asked.popleft()[1]()
            if future is not None and not future.done():
                future.set_exception(
                    LookupTimedOut(f"no answer from the store in {self.wait_deadline:g} s")
                )
                timed_out += 1
        if timed_out:
            log.warning(
                "store lookups: %d requests got no answer in %g s (tryLater)",
                timed_out,
                self.wait_deadline,
            )
        # answered waiters are dropped from the front as they age, whatever their state
        if asked:
            self._watchdog = loop.call_later(self.wait_deadline / 3, self._expire, loop)

    @property
    def waiting(self) -> int:
        """Distinct keys asked and not yet sent (what ``queue_limit`` bounds)."""
        return len(self._pending)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send what is pending, in batches of at most ``max_batch`` keys, while fewer than
        ``max_in_flight`` batches run; the rest waits for a batch to finish."""
        self._scheduled = False
        while self._pending and self._in_flight < self.max_in_flight:
            if len(self._pending) <= self.max_batch:
                taken, self._pending = self._pending, {}
            else:
                keys = list(self._pending)[: self.max_batch]
                taken = {key: self._pending.pop(key) for key in keys}
            want_response = self._want_response.intersection(taken)
            self._want_response.difference_update(taken)
            # keys whose every waiter was cancelled meanwhile need no answer
            batch = {k: w for k, w in taken.items() if not all(f.done() for f in w)}
            if not batch:
                continue
            self.batches += 1
            self.keys += len(batch)
            metrics.store_lookup_batch_keys.observe(len(batch))
            self._in_flight += 1
            task = loop.create_task(self._answer(batch, want_response))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._pending and not self._scheduled:
            self._flush(task.get_loop())

    async def _answer(self, batch: Waiters, want_response: set[Key]) -> None:
        try:
            replicas = self.store.replicas
            if replicas is None or not replicas.replicas:
                await self._from_primary(batch)
                return
            groups: dict[asyncpg.Pool | None, Waiters] = {}
            for key, waiters in batch.items():
                groups.setdefault(replicas.pick(key), {})[key] = waiters
            await asyncio.gather(
                *(
                    self._from_primary(group)
                    if pool is None
                    else self._from_replica(pool, group, want_response)
                    for pool, group in groups.items()
                )
            )
        finally:
            # only when the task itself was cancelled can a waiter be left without answer
            _fail(batch, LookupInterrupted("store lookup interrupted"))

    async def _from_primary(self, group: Waiters) -> None:
        try:
            answers = await self._query(self.store.pool, list(group))
        except Exception as exc:
            _fail(group, exc)
            return
        for key, waiters in group.items():
            _deliver(waiters, answers[key])

    async def _from_replica(
        self, pool: asyncpg.Pool, group: Waiters, want_response: set[Key]
    ) -> None:
        """A replica's "nothing" is never final (it may not have replayed a recording)."""
        try:
            answers = await self._query(pool, list(group))
        except Exception as exc:  # a failing replica must not fail the lookup
            log.warning("replica read failed (%s); using the primary", type(exc).__name__)
            answers = {}
        rest: Waiters = {}
        for key, waiters in group.items():
            answer = answers.get(key)
            if (
                answer is not None
                and answer.knowledge.known
                and (answer.response is not None or key not in want_response)
            ):
                _deliver(waiters, answer)
            else:
                rest[key] = waiters
        if rest:
            await self._from_primary(rest)

    async def _query(self, pool: asyncpg.Pool, keys: list[Key]) -> dict[Key, Lookup]:
        """One statement for ``keys`` (distinct); asyncpg prepares it once per connection."""
        self.statements += 1
        rows = await pool.fetch(
            LOOKUP_STATEMENTS[self.store.ct_not_after],
            [issuer_id for issuer_id, _ in keys],
            [key for _, key in keys],
        )
        return {keys[row["i"] - 1]: lookup_from_row(row) for row in rows}


def _deliver(waiters: list[asyncio.Future[Lookup]], answer: Lookup) -> None:
    for future in waiters:
        if not future.done():  # a cancelled waiter
            future.set_result(answer)


def _fail(group: Waiters, exc: BaseException) -> None:
    for waiters in group.values():
        for future in waiters:
            if not future.done():
                future.set_exception(exc)
