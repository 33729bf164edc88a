"""Batched store lookups against the single-row reads they replace, in one run.

    .venv/bin/python benchmarks/store_lookup.py                  # ~30 s
    .venv/bin/python benchmarks/store_lookup.py --rows 200000 --duration 5

Starts its own PostgreSQL, loads ``--rows`` certificate records with 760-byte responses
(half of them without a response: the on-demand population), then for each case runs
``--concurrency`` coroutines looping lookups for ``--duration`` seconds through a pool of
10 connections, and reports lookups/s and CPU microseconds per lookup of this process
(the responder's side) and of the PostgreSQL backends:

- store hit: ``fetch_response`` vs ``BatchedLookup.get``;
- on-demand read (recorded, no response): ``fetch_response`` + ``knowledge`` vs ``get``;
- unknown serial: ``fetch_response`` + ``knowledge`` vs ``get``.

Only the database side of a cache miss is measured here (no HTTP, no signing); the hot
path as a whole is benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import cpu_seconds
from responder.store import PresignedStore
from responder.store_lookup import BatchedLookup
from tests.pgcluster import PgCluster
from tests.support import create_database

#: serials are BASE + n: eight bytes with a non-zero top byte, so ``int8send`` in SQL is
#: exactly ``serial_key`` (the minimal DER INTEGER content)
BASE = 1 << 56

LOAD = """
INSERT INTO issuers (id, spki_sha256, name, subject) VALUES (1, sha256('b'), 'b', 'CN=b');
INSERT INTO certificates (issuer_id, serial, not_after, kinds)
  SELECT 1, int8send({base} + g), now() + interval '90 days', 2 FROM generate_series(1, {rows}) g;
INSERT INTO responses (issuer_id, serial, status, this_update, next_update, der)
  SELECT 1, int8send({base} + g), 0, now(), now() + interval '4 days',
         convert_to(repeat('x', 760), 'UTF8') FROM generate_series(1, {rows}, 2) g;
ANALYZE;
"""


async def measure(
    pool: asyncpg.Pool,
    lookup_once: Callable[[int], Awaitable[object]],
    serials: Callable[[], int],
    concurrency: int,
    duration: float,
) -> tuple[float, float, float]:
    """(lookups/s, client CPU µs per lookup, PostgreSQL CPU µs per lookup)."""
    pids = [r["pid"] for r in await pool.fetch("SELECT pid FROM pg_stat_activity")]
    done = 0
    stop = time.monotonic() + duration

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await lookup_once(serials())
            done += 1

    cpu0, pg0, t0 = time.process_time(), cpu_seconds(pids), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu1, pg1, t1 = time.process_time(), cpu_seconds(pids), time.monotonic()
    return done / (t1 - t0), (cpu1 - cpu0) / done * 1e6, (pg1 - pg0) / done * 1e6


async def run(dsn: str, rows: int, concurrency: int, duration: float) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(LOAD.format(rows=rows, base=BASE))
    await conn.close()
    store = await PresignedStore.connect(dsn, min_size=10, max_size=10)
    lookup = BatchedLookup(store)
    rng = random.Random(1)

    def hit() -> int:  # odd: with a response
        return BASE + rng.randrange(rows // 2) * 2 + 1

    def on_demand() -> int:  # even: recorded, no response
        return BASE + rng.randrange(1, rows // 2) * 2

    def unknown() -> int:
        return BASE + rows + 1 + rng.randrange(rows)

    async def single_hit(serial: int) -> None:
        await store.fetch_response(1, serial)

    async def single_both(serial: int) -> None:
        await store.fetch_response(1, serial)
        await store.knowledge(1, serial)

    async def batched(serial: int) -> None:
        await lookup.get(1, serial)

    cases = [
        ("store hit", hit, single_hit),
        ("on-demand read", on_demand, single_both),
        ("unknown serial", unknown, single_both),
    ]
    print(f"{rows} rows, {concurrency} concurrent, {duration:.0f} s per measurement, pool 10")
    print(f"{'case':16} {'reads':8} {'lookups/s':>10} {'client µs':>10} {'PG µs':>8}")
    try:
        for name, serials, single in cases:
            for label, once in (("single", single), ("batched", batched)):
                before = lookup.statements, lookup.keys
                rate, client, pg = await measure(store.pool, once, serials, concurrency, duration)
                extra = ""
                if label == "batched":
                    statements = lookup.statements - before[0]
                    extra = f"  ({(lookup.keys - before[1]) / max(statements, 1):.1f} keys/stmt)"
                print(f"{name:16} {label:8} {rate:10.0f} {client:10.1f} {pg:8.1f}{extra}")
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    cluster = PgCluster().init().start()
    try:
        asyncio.run(run(create_database(cluster.dsn()), args.rows, args.concurrency, args.duration))
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
