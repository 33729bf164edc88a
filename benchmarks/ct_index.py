"""CT index throughput: parse + filter + leaf hash + indexing into PostgreSQL.

The real navigli2025h2 tiles (1,024 precert entries, all four staging issuers
configured, so every entry is ours) are parsed and filtered as the follower does, then
committed in batches of ``--batch`` entries through ``CTIndexStore.commit_batch``: index
rows, the coverage-gap check, and the log position, one transaction per batch, through
the follower's own pipeline (``ct_indexer.pipelined``: the next batch is parsed while
the previous one commits). Each
round gives the serials a fresh high bit, so every round inserts new rows (as a log
full of new certificates would).

Two cases, each measured over the same entries:

* ``recorded``: the CA recorded every serial (a response row exists): the steady state.
* ``all gaps``: no serial has a response, so every entry also becomes a coverage_gaps row
  (the worst case: the CA's writes were all lost). Gap *signing* is not included.

The baseline, measured in the same run, is parse + filter alone (no database).

    .venv/bin/python benchmarks/ct_index.py [--rounds N] [--batch N]

Uses $DATABASE_URL (a superuser DSN; a scratch database is created in it) or starts a
throwaway PostgreSQL cluster with fsync on (tests/pgcluster.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from responder.ct.leaf import (  # noqa: E402
    IndexedEntry,
    Issuer,
    IssuerSet,
    extract,
    iter_tile_entries,
    leaf_hash_of,
)
from responder.ct_index_store import CTIndexStore, IndexRow  # noqa: E402
from responder.ct_indexer import pipelined  # noqa: E402
from responder.schema import migrate  # noqa: E402
from responder.store import serial_key  # noqa: E402

FIXTURES = ROOT / ".." / "shared" / "fixtures" / "ct"
NAMES = ("e5-cross.pem", "e6-cross.pem", "r10.pem", "r11.pem")
REPEATS = 3  # each figure is the best of this many runs (the machine is shared)


def parse_round(tiles: list[bytes], issuers: IssuerSet) -> list[IndexedEntry]:
    """What the follower does per entry before the database: framing, leaf hash, filter."""
    found: list[IndexedEntry] = []
    for k, tile in enumerate(tiles):
        for i, raw in enumerate(iter_tile_entries(tile, 256, exact=True)):
            leaf_hash_of(tile, raw)
            entry = extract(tile, raw, k * 256 + i, issuers)
            if isinstance(entry, IndexedEntry):
                found.append(entry)
    return found


async def scratch_database(admin_dsn: str) -> str:
    name = "bench_" + secrets.token_hex(4)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = admin_dsn.rpartition("/")[0] + "/" + name
    await migrate(dsn)
    return dsn


async def run_case(
    dsn: str, tiles: list[bytes], issuers: IssuerSet, rounds: int, batch: int, recorded: bool
) -> float:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    store = CTIndexStore(pool)
    ids: dict[bytes, int] = {}
    for i, key_hash in enumerate(issuers.by_key_hash):
        ids[key_hash] = await pool.fetchval(
            "INSERT INTO issuers (spki_sha256, name, subject) VALUES ($1, $2, 'x') "
            "ON CONFLICT (spki_sha256) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            key_hash,
            f"issuer{i}",
        )
    log = await store.ensure_log(secrets.token_bytes(32), "bench", "http://bench.invalid")
    if recorded:  # the CA's responses for every serial of every round (not timed)
        for r in range(rounds * REPEATS):
            entries = parse_round(tiles, issuers)
            await pool.execute(
                "INSERT INTO responses (issuer_id, serial, status, this_update, next_update, "
                "der) SELECT i, s, 0, now(), now(), '\\x00' "
                "FROM unnest($1::smallint[], $2::bytea[]) AS u(i, s) ON CONFLICT DO NOTHING",
                [ids[e.issuer_key_hash] for e in entries],
                [serial_key(e.serial ^ ((r + 1) << 200)) for e in entries],
            )
    position = 0
    gaps = 0
    best = 0.0
    for rep in range(REPEATS):
        t0 = time.perf_counter()
        start_position = position
        position, gaps = await index_rounds(
            store,
            log.db_id,
            ids,
            tiles,
            issuers,
            range(rep * rounds, (rep + 1) * rounds),
            batch,
            position,
            gaps,
        )
        best = max(best, (position - start_position) / (time.perf_counter() - t0))
    indexed = await pool.fetchval("SELECT count(*) FROM ct_index")
    await pool.close()
    assert indexed == position, (indexed, position)
    assert gaps == (0 if recorded else position), gaps
    return best


async def index_rounds(
    store: CTIndexStore,
    log_db_id: int,
    ids: dict[bytes, int],
    tiles: list[bytes],
    issuers: IssuerSet,
    rounds: range,
    batch: int,
    position: int,
    gaps: int,
) -> tuple[int, int]:
    """Parse, filter and commit ``rounds`` passes in batches of ``batch`` entries, through
    the follower's own pipeline (the next batch is parsed while one commits)."""
    first = position

    async def batches() -> AsyncIterator[list[IndexRow]]:
        pending: list[IndexRow] = []
        at = first
        for r in rounds:
            for e in parse_round(tiles, issuers):
                pending.append(
                    IndexRow(
                        ids[e.issuer_key_hash],
                        e.serial ^ ((r + 1) << 200),
                        at,
                        e.kind,
                        e.timestamp_ms,
                    )
                )
                at += 1
            if len(pending) >= batch:
                yield pending
                pending = []
            await asyncio.sleep(0)  # the follower awaits its next tile fetch here
        if pending:
            yield pending

    counts = [position, gaps]

    async def commit(chunk: list[IndexRow]) -> None:
        start = counts[0]
        end = start + len(chunk)
        outcome = await store.commit_batch(
            log_db_id, "bench", start, chunk, json.dumps({"bench": end}), end, end
        )
        counts[0] = end
        counts[1] += len(outcome.gaps)

    await pipelined(batches(), commit)
    return counts[0], counts[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40, help="passes over the 1,024 entries")
    ap.add_argument("--batch", type=int, default=4096, help="entries per transaction")
    args = ap.parse_args()
    tiles = [(FIXTURES / f"navigli2025h2/tile/data/{k:03d}").read_bytes() for k in range(4)]
    issuers = IssuerSet(
        Issuer.from_certificate((FIXTURES / "issuers" / n).read_bytes()) for n in NAMES
    )

    baseline = 0.0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            parse_round(tiles, issuers)
        baseline = max(baseline, args.rounds * 1024 / (time.perf_counter() - t0))

    from tests.pgcluster import superuser_dsn

    with superuser_dsn({"fsync": "on", "full_page_writes": "on"}) as admin:
        results = {}
        for label, recorded in (("recorded", True), ("all gaps", False)):
            dsn = asyncio.run(scratch_database(admin))
            results[label] = asyncio.run(
                run_case(dsn, tiles, issuers, args.rounds, args.batch, recorded)
            )
    n = args.rounds * 1024
    print(f"ct_index: parse+filter only (baseline): {baseline:,.0f} entries/s")
    for label, rate in results.items():
        print(
            f"ct_index: parse+filter+index into PostgreSQL ({label}): {rate:,.0f} entries/s "
            f"({rate / baseline:.2f} of baseline; {n} entries per run, batches of "
            f"{args.batch}, best of {REPEATS})"
        )


if __name__ == "__main__":
    main()
