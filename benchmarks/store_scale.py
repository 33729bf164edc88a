"""Store at scale: load N certificate records with responses, then measure at that size.

    .venv/bin/python benchmarks/store_scale.py --rows 10000000      # ~15-25 min, ~20 GB disk
    .venv/bin/python benchmarks/store_scale.py --rows 200000        # a quick look

Starts its own PostgreSQL (fsync on, as in production) under --data-dir unless --dsn is
given, migrates it, loads N rows into ``certificates`` and ``responses`` (every response is
the bytes of a real signed P-256 delegated-responder response, 789 bytes, so row sizes are
real; serials are 17-byte random-looking values as a CA's are), then measures at that size:

- bytes per certificate record and per stored response, with their indexes;
- store-hit lookup latency (p50/p99) and throughput through ``PresignedStore.fetch_response``,
  against a ``SELECT 1`` round trip measured in the same run (the ratio is the figure);
- recording throughput (sign + one-transaction write, ``record_certificates``) at that size,
  against the same on an empty database in the same run;
- refresher throughput (claim due rows with SKIP LOCKED, re-sign, write back).

Writes JSON to benchmarks/results/store_scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from responder.schema import migrate
from responder.store import CertificateRecord, PresignedStore
from signer.demo_ca import create_ca
from signer.issuers import Issuer, issuer_from_certificate, make_responder
from signer.response_builder import CertStatus, ValidityPolicy, sign_response
from tests.pgcluster import PgCluster

CHUNK = 500_000


def serial_for(i: int) -> int:
    """The i-th synthetic serial: 0x01 || md5(i), the same value the SQL loader writes."""
    return int.from_bytes(b"\x01" + hashlib.md5(str(i).encode()).digest(), "big")


def make_issuer() -> Issuer:
    ca = create_ca("p256", "Scale")
    issuer = issuer_from_certificate("scale", ca.ca_cert)
    issuer.responders.append(
        make_responder(issuer, ca.responder_cert, ca.responder_key, delegated=True)
    )
    return issuer


async def load(dsn: str, rows: int, template: bytes) -> float:
    """Bulk-load ``rows`` records + responses in chunks; returns rows/s."""
    conn = await asyncpg.connect(dsn)
    started = time.perf_counter()
    try:
        for first in range(0, rows, CHUNK):
            last = min(rows, first + CHUNK) - 1
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO certificates (issuer_id, serial, not_after, kinds) "
                    "SELECT 1, '\\x01'::bytea || decode(md5(i::text), 'hex'), "
                    "       now() + ((i % 90) || ' days')::interval, 2 "
                    "FROM generate_series($1::bigint, $2::bigint) AS i",
                    first,
                    last,
                )
                await conn.execute(
                    "INSERT INTO responses (issuer_id, serial, status, this_update, "
                    "                       next_update, der) "
                    "SELECT 1, '\\x01'::bytea || decode(md5(i::text), 'hex'), 0, "
                    "       now() - interval '1 hour' - ((i % 48) || ' hours')::interval, "
                    "       now() + interval '95 hours' - ((i % 48) || ' hours')::interval, $3 "
                    "FROM generate_series($1::bigint, $2::bigint) AS i",
                    first,
                    last,
                    template,
                )
            done = last + 1
            rate = done / (time.perf_counter() - started)
            print(f"  loaded {done:>11,} rows  ({rate:,.0f} rows/s)", flush=True)
        await conn.execute("ANALYZE certificates")
        await conn.execute("ANALYZE responses")
    finally:
        await conn.close()
    return rows / (time.perf_counter() - started)


async def sizes(dsn: str, rows: int) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        out: dict[str, float] = {}
        for table in ("certificates", "responses"):
            heap = await conn.fetchval("SELECT pg_table_size($1::regclass)", table)
            idx = await conn.fetchval("SELECT pg_indexes_size($1::regclass)", table)
            out[f"{table}_heap_bytes_per_row"] = heap / rows
            out[f"{table}_index_bytes_per_row"] = idx / rows
            out[f"{table}_total_bytes_per_row"] = (heap + idx) / rows
        return out
    finally:
        await conn.close()


async def closed_loop(concurrency: int, seconds: float, op: object) -> tuple[float, list[float]]:
    """Run ``op`` from ``concurrency`` tasks for ``seconds``; returns (ops/s, latencies)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await op()  # type: ignore[operator]
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - t0), latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def lookups(dsn: str, rows: int, seconds: float) -> dict[str, float]:
    store = await PresignedStore.connect(dsn, min_size=16, max_size=16)
    try:
        hits = 0

        async def fetch() -> None:
            nonlocal hits
            row = await store.fetch_response(1, serial_for(random.randrange(rows)))
            hits += row is not None

        async def select_one() -> None:
            await store.pool.fetchval("SELECT 1")

        base_rate, base_lat = await closed_loop(16, seconds, select_one)
        rate, lat = await closed_loop(16, seconds, fetch)
        assert hits > 0.99 * len(lat), "lookups must hit existing rows"
        return {
            "lookup_per_s": rate,
            "lookup_p50_ms": pct(lat, 0.5),
            "lookup_p99_ms": pct(lat, 0.99),
            "select1_per_s": base_rate,
            "select1_p50_ms": pct(base_lat, 0.5),
            "lookup_vs_select1": rate / base_rate,
        }
    finally:
        await store.close()


async def recording(dsn: str, issuer: Issuer, count: int, batch: int) -> float:
    """Sign + durable one-transaction writes of ``count`` new serials; returns certs/s."""
    store = await PresignedStore.connect(dsn, min_size=4, max_size=4)
    policy = ValidityPolicy()
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=90)
    try:
        t0 = time.perf_counter()

        async def one_batch(start: int) -> None:
            items = []
            for _ in range(start, min(count, start + batch)):
                serial = random.getrandbits(127) | (1 << 126)
                signed = sign_response(issuer, serial, CertStatus.GOOD, policy)
                items.append((CertificateRecord(issuer.db_id, serial, not_after, False), signed))
            await store.record_certificates(items)

        for start in range(0, count, batch):
            await one_batch(start)
        return count / (time.perf_counter() - t0)
    finally:
        await store.close()


async def refresher(dsn: str, issuer: Issuer, count: int, batch: int) -> float:
    """Claim ``count`` due rows in SKIP LOCKED batches, re-sign, write back; rows/s."""
    conn = await asyncpg.connect(dsn)
    policy = ValidityPolicy()
    try:
        await conn.execute(
            "UPDATE responses SET next_update = now() + interval '1 hour' "
            "WHERE serial IN (SELECT serial FROM responses WHERE issuer_id = 1 LIMIT $1)",
            count,
        )
        done = 0
        t0 = time.perf_counter()
        while done < count:
            async with conn.transaction():
                due = await conn.fetch(
                    "SELECT serial, status FROM responses "
                    "WHERE next_update < now() + $1::interval "
                    "ORDER BY next_update LIMIT $2 FOR UPDATE SKIP LOCKED",
                    policy.refresh_margin,
                    batch,
                )
                if not due:
                    break
                signed = [
                    sign_response(
                        issuer,
                        int.from_bytes(r["serial"], "big", signed=True),
                        CertStatus.GOOD,
                        policy,
                    )
                    for r in due
                ]
                await conn.execute(
                    "UPDATE responses r SET der = u.der, this_update = u.tu, "
                    "next_update = u.nu FROM unnest($1::bytea[], $2::bytea[], "
                    "$3::timestamptz[], $4::timestamptz[]) AS u(serial, der, tu, nu) "
                    "WHERE r.issuer_id = 1 AND r.serial = u.serial",
                    [r["serial"] for r in due],
                    [s.der for s in signed],
                    [dt.datetime.fromtimestamp(s.this_update, dt.UTC) for s in signed],
                    [dt.datetime.fromtimestamp(s.next_update, dt.UTC) for s in signed],
                )
                done += len(due)
        return done / (time.perf_counter() - t0)
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    issuer = make_issuer()
    template = sign_response(issuer, serial_for(0), CertStatus.GOOD, ValidityPolicy()).der
    cluster = None
    if args.dsn:
        admin_dsn = args.dsn
    else:
        cluster = PgCluster(
            {
                "fsync": "on",
                "full_page_writes": "on",
                "shared_buffers": "2GB",
                "max_wal_size": "16GB",
                "checkpoint_timeout": "30min",
                "synchronous_commit": "on",
            },
            base=Path(args.data_dir) if args.data_dir else None,
        )
        cluster.init().start()
        admin_dsn = cluster.dsn()
    try:
        results: dict[str, object] = {"rows": args.rows, "response_bytes": len(template)}
        dsns = {}
        conn = await asyncpg.connect(admin_dsn)
        for name in ("scale_big", "scale_empty"):
            dsns[name] = admin_dsn.rsplit("/", 1)[0] + "/" + name
            if name == "scale_big" and args.reuse:
                continue
            await conn.execute(f"DROP DATABASE IF EXISTS {name}")
            await conn.execute(f"CREATE DATABASE {name}")
        await conn.close()
        for name, dsn in dsns.items():
            if name == "scale_big" and args.reuse:
                # same issuer row id, new key: re-point the row so signing works
                big = await asyncpg.connect(dsn)
                await big.execute(
                    "UPDATE issuers SET spki_sha256 = $1 WHERE id = 1", issuer.spki_sha256
                )
                await big.close()
            await migrate(dsn)
            store = await PresignedStore.connect(dsn, min_size=1, max_size=1)
            await store.register_issuers([issuer])
            await store.close()
        assert issuer.db_id == 1
        if args.reuse:
            print(f"reusing the loaded {args.rows:,} rows", flush=True)
        else:
            print(f"loading {args.rows:,} rows ...", flush=True)
            results["load_rows_per_s"] = await load(dsns["scale_big"], args.rows, template)
        results.update(await sizes(dsns["scale_big"], args.rows))
        print("measuring lookups ...", flush=True)
        results.update(await lookups(dsns["scale_big"], args.rows, args.seconds))
        print("measuring recording ...", flush=True)
        results["record_per_s_at_size"] = await recording(
            dsns["scale_big"], issuer, args.record, 500
        )
        results["record_per_s_empty"] = await recording(
            dsns["scale_empty"], issuer, args.record, 500
        )
        print("measuring refresher ...", flush=True)
        results["refresh_per_s_at_size"] = await refresher(
            dsns["scale_big"], issuer, args.refresh, 500
        )
        sign_t0 = time.perf_counter()
        for k in range(2000):
            sign_response(issuer, k + 1, CertStatus.GOOD, ValidityPolicy())
        results["sign_per_s_one_core"] = 2000 / (time.perf_counter() - sign_t0)
        return results
    finally:
        if cluster is not None and not args.keep:
            cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dsn", help="superuser DSN of an existing server (else one is started)")
    parser.add_argument("--data-dir", help="where to put the throwaway cluster (needs space)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per lookup measurement")
    parser.add_argument("--record", type=int, default=20_000, help="certificates to record")
    parser.add_argument("--refresh", type=int, default=20_000, help="responses to refresh")
    parser.add_argument("--keep", action="store_true", help="keep the cluster afterwards")
    parser.add_argument(
        "--reuse", action="store_true", help="with --dsn: measure the already loaded scale_big"
    )
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "store_scale.json").write_text(json.dumps(results, indent=2))
    print()
    for key, value in results.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}"
        print(f"{key:34} {shown}")


if __name__ == "__main__":
    main()
