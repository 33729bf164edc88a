"""Store lookups of the hot path, coalesced: one statement answers a whole batch.

A cache miss needs, for one (issuer, serial), the pre-signed ``responses`` row and what the
store knows of the serial (recorded, seen in CT, revoked: ``Knowledge``). Asked one request
at a time that is one or two round trips each, and each costs more client and PostgreSQL
CPU than the signature it may lead to. ``BatchedLookup.get`` instead queues the key; the
first ``get`` of an event-loop iteration schedules a flush with ``loop.call_soon``, so every
key asked in the same iteration joins one statement:

    FROM unnest($1::smallint[], $2::bytea[]) WITH ORDINALITY AS q(issuer_id, serial, i)
    LEFT JOIN LATERAL (one primary-key probe) for responses, certificates, revocations,
    ct_index

(primary-key index probes in a nested loop). A lone request waits no timer: its flush runs
on the next loop iteration. A batch holds at most ``max_batch`` distinct keys (a full one
is flushed at once); a key asked twice is queried once. Several batches may be in flight
together, each on its own pool connection, so the pool bounds them.

If the statement fails, every waiter of that batch gets the exception (the chain answers
tryLater). A waiter that is cancelled only drops its own future; the batch goes on.

With read replicas the rules of ``PresignedStore._read`` hold per key: ``ReplicaSet.pick``
says whether a replica may answer for it (keys are grouped by replica; None: primary);
a replica's answer is final only when it is one the single-row reads would have taken
from it (the serial is known, and the response row is there when a waiter needs the row);
otherwise, or when the replica read fails, the key is asked of the primary.
docs/performance.md ("Batched store lookups") has the why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

import asyncpg

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

#: One row per requested key, in request order (i). Each table is read through a LATERAL
#: subquery with LIMIT 1 (the primary key allows one row anyway): a subquery with a LIMIT
#: is not flattened into a join, so the plan stays one primary-key probe per key and table
#: (nested loop, index scans) whatever the table statistics. Without it the planner chose,
#: for a batch of 256, hash joins over sequential scans of tables of 20,000 rows (an
#: EXISTS became a hashed subplan likewise); tests/test_store_lookup.py checks the plan.
LOOKUP_STATEMENT = (
    "SELECT q.i, r.der, r.status, r.this_update, r.next_update, "
    "       r.der IS NOT NULL AS has_response, "
    "       c.not_after, c.not_after IS NOT NULL AS recorded, "
    "       t.seen IS NOT NULL AS in_ct, "
    "       v.revoked_at, v.reason "
    "FROM unnest($1::smallint[], $2::bytea[]) WITH ORDINALITY AS q(issuer_id, serial, i) "
    "LEFT JOIN LATERAL (SELECT der, status, this_update, next_update FROM responses "
    "                   WHERE issuer_id = q.issuer_id AND serial = q.serial LIMIT 1) r "
    "  ON true "
    "LEFT JOIN LATERAL (SELECT not_after FROM certificates "
    "                   WHERE issuer_id = q.issuer_id AND serial = q.serial LIMIT 1) c "
    "  ON true "
    "LEFT JOIN LATERAL (SELECT revoked_at, reason FROM revocations "
    "                   WHERE issuer_id = q.issuer_id AND serial = q.serial LIMIT 1) v "
    "  ON true "
    "LEFT JOIN LATERAL (SELECT true AS seen FROM ct_index "
    "                   WHERE issuer_id = q.issuer_id AND serial = q.serial LIMIT 1) t "
    "  ON true"
)

Key = tuple[int, bytes]  # (issuer id, serial key)
Waiters = dict[Key, list["asyncio.Future[Lookup]"]]


class Lookup(NamedTuple):
    """Everything the chain needs about one serial, from one statement."""

    #: the pre-signed row (SHA-1 CertID), or None
    response: StoredResponse | None
    knowledge: Knowledge


class LookupInterrupted(Exception):
    """The batch ended (its task was cancelled, e.g. at shutdown) before answering."""


def lookup_from_row(row: asyncpg.Record) -> Lookup:
    """One row of ``LOOKUP_STATEMENT`` as what ``fetch_response`` + ``knowledge`` give."""
    has_response = bool(row["has_response"])
    response = stored_response_from_row(row) if has_response else None
    return Lookup(response, knowledge_from_row(row, has_response=has_response))


class BatchedLookup:
    """Coalesces concurrent store lookups into one statement per event-loop iteration."""

    def __init__(self, store: PresignedStore, *, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        #: statements sent (replica and primary, failed ones included), batches formed,
        #: keys asked: for tests and for judging the batching
        self.statements = 0
        self.batches = 0
        self.keys = 0
        self._pending: Waiters = {}
        #: keys of the pending batch for which some waiter uses the response row
        self._want_response: set[Key] = set()
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, issuer_id: int, serial: int, *, want_response: bool = True) -> Lookup:
        """The stored response and knowledge of one serial, from the next batch.

        ``want_response`` False (a CertID the stored row cannot answer, i.e. not SHA-1)
        lets a replica's answer stand without the row, as ``knowledge`` alone would.
        Raises what the statement raised (asyncpg/OS errors) when the batch fails."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lookup] = loop.create_future()
        key = (issuer_id, serial_key(serial))
        waiters = self._pending.get(key)
        if waiters is None:
            self._pending[key] = [future]
        else:
            waiters.append(future)
        if want_response:
            self._want_response.add(key)
        if len(self._pending) >= self.max_batch:
            self._flush(loop)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._scheduled_flush, loop)
        return await future

    def _scheduled_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, {}
        want_response, self._want_response = self._want_response, set()
        # keys whose every waiter was cancelled meanwhile need no answer
        batch = {k: w for k, w in batch.items() if not all(f.done() for f in w)}
        if not batch:
            return
        self.batches += 1
        self.keys += len(batch)
        task = loop.create_task(self._answer(batch, want_response))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            LOOKUP_STATEMENT, [issuer_id for issuer_id, _ in keys], [key for _, key in keys]
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
