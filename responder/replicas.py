"""Read replicas: where lookups may read, and when they must not.

Lookups read from a streaming replica when one is healthy; writes always go to the
primary. Replica lag must never cause a wrong answer, so:

- a miss on a replica falls through to the primary before on-demand signing or a
  "not found" answer (a fresh recording may not have been replayed yet);
- after a revocation (learned through the primary's notification), that serial is read
  from the primary until every replica has replayed past the primary's WAL position at
  the moment we learned of it (its *barrier* LSN), so a stale "good" row on a lagging
  replica is never served;
- when notifications may have been missed (at start, before the listener's first LISTEN,
  while it is disconnected, and after it reconnects), every read goes to the primary
  until the replicas pass the barrier taken once it listens (again);
- a replica that fails its health probe, or lags more than ``max_lag``, is not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from responder import metrics

log = logging.getLogger(__name__)


#: barrier of a pin whose WAL position is still being read: above every real position
UNRESOLVED = (1 << 64) - 1


def parse_lsn(text: str | None) -> int:
    """'16/B374D848' -> integer position (0 when unknown)."""
    if not text:
        return 0
    high, _, low = str(text).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(eq=False)
class Replica:
    name: str
    pool: asyncpg.Pool
    healthy: bool = False
    replay_lsn: int = 0
    lag_seconds: float = 0.0


@dataclass
class ReplicaSet:
    """The replicas one process reads from, with their health and replay positions."""

    replicas: list[Replica]
    primary: asyncpg.Pool
    max_lag: float = 30.0
    probe_interval: float = 0.2
    #: (issuer_id, serial key) -> barrier LSN: read from the primary until replicas pass it
    pins: dict[tuple[int, bytes], int] = field(default_factory=dict)
    #: all reads go to the primary until the replicas pass this LSN (0: no global barrier)
    global_barrier: int = 0
    _task: asyncio.Task[None] | None = None
    _pending: set[asyncio.Task[None]] = field(default_factory=set)
    #: barrier reads under way, per pinned key (None: the global barrier): [how many,
    #: highest position read so far]; a pin is resolved only when the last one is back
    _resolving: dict[tuple[int, bytes] | None, list[int]] = field(default_factory=dict)
    #: the listener is away (``hold_everything``): the global barrier stays unresolved
    _held: bool = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._probe_forever(), name="replica-probe")

    async def close(self) -> None:
        for pending in list(self._pending):
            pending.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for replica in self.replicas:
            await replica.pool.close()

    def pick(self, key: tuple[int, bytes] | None = None) -> asyncpg.Pool | None:
        """A healthy replica allowed to answer for ``key``, or None (use the primary)."""
        candidates = [r for r in self.replicas if r.healthy]
        if not candidates:
            return None
        floor = self.global_barrier
        if key is not None:
            floor = max(floor, self.pins.get(key, 0))
        if floor:
            candidates = [r for r in candidates if r.replay_lsn >= floor]
            if not candidates:
                return None
        return random.choice(candidates).pool

    async def barrier(self) -> int:
        """The primary's current WAL position: anything committed so far is before it."""
        return parse_lsn(await self.primary.fetchval("SELECT pg_current_wal_lsn()::text"))

    def pin_now(self, issuer_id: int, serial_key: bytes) -> None:
        """Pin at once (from a notification callback), resolving the barrier in the
        background: until then the serial is read from the primary only."""
        if not self.replicas:
            return
        key = (issuer_id, serial_key)
        self.pins[key] = UNRESOLVED
        self._begin(key)
        self._spawn(self._resolve(key))

    def pin_everything_now(self) -> None:
        """After notifications may have been lost: primary only until the replicas catch
        up (usable from a synchronous callback). Called once a LISTEN is in place: the
        barrier read after it covers everything missed before."""
        if not self.replicas:
            return
        self.global_barrier = UNRESOLVED
        self._held = False
        self._begin(None)
        self._spawn(self._resolve(None))

    def hold_everything(self) -> None:
        """Primary only from now until the next ``pin_everything_now``: the listener lost
        its connection, so notifications are being missed right now, and no barrier read
        before the next LISTEN can cover them."""
        if not self.replicas:
            return
        self.global_barrier = UNRESOLVED
        self._held = True

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _begin(self, key: tuple[int, bytes] | None) -> None:
        self._resolving.setdefault(key, [0, 0])[0] += 1

    async def _resolve(self, key: tuple[int, bytes] | None) -> None:
        """Read the barrier; the pin takes the highest position read by every resolution
        begun meanwhile, once the last is back. One that began earlier may have read the
        position before a later change committed (its query was on its way when the later
        notification came, or a reconnection came while it retried): set alone, its lower
        barrier would lift the later pin before a replica replayed that change (a
        revocation acknowledged while the listener was away, then "good" from a replica)."""
        lsn = await self._barrier_with_retry()
        state = self._resolving[key]
        state[0] -= 1
        state[1] = max(state[1], lsn)
        if state[0]:
            return
        del self._resolving[key]
        if key is None:
            if self.global_barrier == UNRESOLVED and not self._held:
                self.global_barrier = state[1]
        elif self.pins.get(key) == UNRESOLVED:
            self.pins[key] = state[1]

    async def _barrier_with_retry(self) -> int:
        """The primary's position; while it cannot be read, the pin stays unresolved
        (reads go to the primary, which is the safe side)."""
        while True:
            try:
                return await self.barrier()
            except Exception:
                await asyncio.sleep(0.5)

    async def pin(self, issuer_id: int, serial_key: bytes) -> None:
        """Read this serial from the primary until the replicas have replayed its change
        (after our own commit: the pin is in place when this returns, its barrier is read
        in the background like a notification's, so it never lowers a later pin)."""
        self.pin_now(issuer_id, serial_key)

    def ready_detail(self) -> str:
        healthy = sum(r.healthy for r in self.replicas)
        return f"replicas {healthy}/{len(self.replicas)} healthy"

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(r) for r in self.replicas))
            self._forget_passed_pins()
            await asyncio.sleep(self.probe_interval)

    async def _probe(self, replica: Replica) -> None:
        was = replica.healthy
        try:
            row = await asyncio.wait_for(
                replica.pool.fetchrow(
                    "SELECT pg_is_in_recovery() AS standby, "
                    "       coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text "
                    "         AS lsn, "
                    "       CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() "
                    "            THEN 0 ELSE extract(epoch FROM now() "
                    "                 - pg_last_xact_replay_timestamp()) END AS lag"
                ),
                timeout=1.0,
            )
            assert row is not None
            replica.replay_lsn = parse_lsn(row["lsn"])
            replica.lag_seconds = float(row["lag"] or 0.0)
            replica.healthy = replica.lag_seconds <= self.max_lag
        except Exception as exc:
            replica.healthy = False
            if was:
                log.warning("replica %s unusable: %s", replica.name, type(exc).__name__)
        if was != replica.healthy and replica.healthy:
            log.info("replica %s usable again", replica.name)
        metrics.db_replica_up.labels(replica.name).set(1 if replica.healthy else 0)
        metrics.db_replica_lag_seconds.labels(replica.name).set(replica.lag_seconds)

    def _forget_passed_pins(self) -> None:
        if not self.replicas:
            return
        slowest = min(r.replay_lsn for r in self.replicas)
        if self.global_barrier and slowest >= self.global_barrier:
            self.global_barrier = 0
        if self.pins:
            self.pins = {k: lsn for k, lsn in self.pins.items() if lsn > slowest}


async def connect_replicas(
    dsns: list[str], primary: asyncpg.Pool, *, max_size: int = 10, max_lag: float = 30.0
) -> ReplicaSet:
    """Pools for every replica; one that is down now is still added and probed later."""
    replicas = []
    for index, dsn in enumerate(dsns):
        pool = asyncpg.create_pool(dsn, min_size=0, max_size=max_size, command_timeout=5, timeout=2)
        await pool  # min_size=0: does not fail when the replica is down
        replicas.append(Replica(name=f"replica{index}", pool=pool))
    # primary only until a barrier is taken (the invalidation listener's first LISTEN,
    # pin_everything_now): a replica may not have replayed a revocation acknowledged
    # before this process started, and no notification of it will ever arrive here
    replica_set = ReplicaSet(
        replicas=replicas, primary=primary, max_lag=max_lag, global_barrier=UNRESOLVED
    )
    await asyncio.gather(*(replica_set._probe(r) for r in replicas))
    return replica_set
