"""Refresher throughput: re-signed rows per second against a real PostgreSQL, as a ratio
to plain signing in the same run (the refresher's cost beyond the signatures themselves:
claiming with SKIP LOCKED, the thread hop, the batched UPDATE, the commit).

    .venv/bin/python benchmarks/refresher.py [--rows N] [--batch B]

Uses $DATABASE_URL (a superuser DSN) or starts a throwaway cluster (tests/pgcluster.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from responder.refresh_store import RefreshStore
from responder.store import PresignedStore, serial_key, to_datetime
from signer.demo_ca import create_ca, make_responder_certificate, random_serial
from signer.issuers import (
    Issuer,
    IssuerRegistry,
    issuer_from_certificate,
    make_responder,
)
from signer.refresher import Refresher, RefresherSettings
from signer.response_builder import CertStatus, SignedResponse, ValidityPolicy, sign_response
from tests.support import create_database


def make_issuer() -> Issuer:
    ca = create_ca("p256", "Bench")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert = make_responder_certificate(
        ca.ca_cert, ca.ca_key, ca.responder_key, not_before=start, lifetime=dt.timedelta(days=365)
    )
    issuer = issuer_from_certificate("bench", ca.ca_cert)
    issuer.responders.append(make_responder(issuer, cert, ca.responder_key, delegated=True))
    return issuer


def sign_old(issuer: Issuer, serials: list[int]) -> tuple[list[SignedResponse], float]:
    """Sign every serial as of 3 days ago (due now); returns the signatures and seconds."""
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    t0 = time.perf_counter()
    signed = [
        sign_response(issuer, s, CertStatus.GOOD, ValidityPolicy(), now=moment) for s in serials
    ]
    return signed, time.perf_counter() - t0


async def seed(
    pool: asyncpg.Pool, issuer: Issuer, serials: list[int], rows: list[SignedResponse]
) -> None:
    await pool.execute("TRUNCATE responses")
    await pool.execute(
        "INSERT INTO responses (issuer_id, serial, status, this_update, next_update, der, signer) "
        "SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::smallint[], $4::timestamptz[], "
        "$5::timestamptz[], $6::bytea[], $7::bigint[])",
        [issuer.db_id] * len(rows),
        [serial_key(s) for s in serials],
        [0] * len(rows),
        [to_datetime(r.this_update) for r in rows],
        [to_datetime(r.next_update) for r in rows],
        [r.der for r in rows],
        [r.signer for r in rows],
    )
    await pool.execute("ANALYZE responses")


async def run(dsn: str, n: int, batch: int) -> None:
    issuer = make_issuer()
    store = await PresignedStore.connect(dsn, max_size=8)
    await store.register_issuers([issuer])
    serials = [random_serial() for _ in range(n)]
    rows, sign_seconds = sign_old(issuer, serials)
    print(f"plain signing:   {n / sign_seconds:8.0f} signatures/s (baseline, one thread)")
    registry = IssuerRegistry([issuer])
    for concurrency in (1, 2):
        await seed(store.pool, issuer, serials, rows)
        settings = RefresherSettings(batch_size=batch, concurrency=concurrency)
        refresher = Refresher(registry, RefreshStore(store.pool), ValidityPolicy(), settings)
        t0 = time.perf_counter()
        report = await refresher.run_pass()
        seconds = time.perf_counter() - t0
        assert report.total == n, report
        rate = n / seconds
        print(
            f"refresher c={concurrency}:  {rate:8.0f} rows/s   "
            f"ratio to plain signing {rate * sign_seconds / n:.2f}"
        )
    t0 = time.perf_counter()
    fresh = await refresher.sample()
    print(f"freshness sample: {1000 * (time.perf_counter() - t0):.0f} ms on {n} rows ({fresh})")
    await store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args()
    from tests.pgcluster import superuser_dsn

    with superuser_dsn() as admin:
        asyncio.run(run(create_database(admin), args.rows, args.batch))


if __name__ == "__main__":
    main()
