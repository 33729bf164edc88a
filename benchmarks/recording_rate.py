"""Recording throughput: certificates made durable (row + P-256-signed response) per second.

Starts its own throwaway PostgreSQL (fsync on, as in production), a real
``ocsp-responder serve``, pre-generates certificates, then measures end to end:

- batch API: ``POST /v1/certificates:batch`` (``--batch`` certificates per call,
  ``--in-flight`` calls at once), timed from the first request to the last 200;
- import: ``ocsp-responder import`` on a PEM bundle, timed as a whole command
  (process start, issuer loading and connecting included).

Each figure is printed with same-run baselines: the raw P-256 signing rate of this
machine (one core, ``key.sign`` on a response-sized message: the floor cost of one
response) and the raw rate of the same two INSERTs with pre-made rows (the database's
ceiling), as ratios. Afterwards every certificate is checked to be in the store.

    .venv/bin/python benchmarks/recording_rate.py [--count 20000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from responder.schema import migrate  # noqa: E402
from responder.store import serial_key  # noqa: E402
from signer.demo_ca import LeafFactory, create_ca  # noqa: E402
from tests.pgcluster import PgCluster  # noqa: E402
from tests.support import VENV_BIN, issuer_files, write_config  # noqa: E402


def raw_signing_rate(seconds: float = 2.0) -> float:
    key = ec.generate_private_key(ec.SECP256R1())
    message = os.urandom(180)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            key.sign(message, ec.ECDSA(hashes.SHA256()))
        count += 100
    return count / (time.perf_counter() - start)


async def raw_insert_rate(dsn: str, count: int, batch: int) -> float:
    """The same two INSERTs the recorder makes, rows pre-made, one transaction per batch."""
    conn = await asyncpg.connect(dsn)
    try:
        issuer_id = await conn.fetchval(
            "INSERT INTO issuers (spki_sha256, name, subject) VALUES ($1, 'raw', 'raw') "
            "RETURNING id",
            os.urandom(32),
        )
        der = os.urandom(480)  # a delegated-responder P-256 response is ~ this size
        start = time.perf_counter()
        for offset in range(0, count, batch):
            n = min(batch, count - offset)
            serials = [serial_key(int.from_bytes(os.urandom(16), "big") >> 1) for _ in range(n)]
            now = __import__("datetime").datetime.now(__import__("datetime").UTC)
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                await conn.execute(
                    "INSERT INTO certificates (issuer_id, serial, not_after, kinds) "
                    "SELECT $1, s, $3, 2 FROM unnest($2::bytea[]) s",
                    issuer_id,
                    serials,
                    now,
                )
                await conn.execute(
                    "INSERT INTO responses (issuer_id, serial, status, this_update, "
                    "next_update, der) SELECT $1, s, 0, $3, $3, $4 FROM unnest($2::bytea[]) s",
                    issuer_id,
                    serials,
                    now,
                    der,
                )
        return count / (time.perf_counter() - start)
    finally:
        await conn.close()


async def batch_api_rate(
    admin_url: str, token: str, bodies: list[bytes], in_flight: int
) -> tuple[float, int]:
    queue = list(reversed(bodies))
    recorded = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal recorded
        while queue:
            body = queue.pop()
            resp = await client.post(
                admin_url + "/v1/certificates:batch",
                content=body,
                headers={"Authorization": f"Bearer {token}"},
            )
            if resp.status_code != 200:
                raise SystemExit(f"batch API answered {resp.status_code}: {resp.text[:300]}")
            recorded += resp.json()["created"]

    async with httpx.AsyncClient(timeout=120) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(in_flight)))
        elapsed = time.perf_counter() - start
    return recorded / elapsed, recorded


async def stored(dsn: str, serials: list[int]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM certificates c JOIN responses r USING (issuer_id, serial) "
                "WHERE c.serial = ANY($1::bytea[])",
                [serial_key(s) for s in serials],
            )
        )
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000, help="certificates per measurement")
    ap.add_argument("--batch", type=int, default=1000, help="certificates per batch call")
    ap.add_argument("--in-flight", type=int, default=3, help="batch calls at once")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="recording-rate-"))
    cluster = PgCluster({"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"})
    cluster.init().start()
    try:
        cluster.psql("CREATE DATABASE bench")
        dsn = cluster.dsn("bench")
        asyncio.run(migrate(dsn))
        ca = create_ca("p256", "Bench")
        issuer = issuer_files("bench", ca, work, delegated=True)
        proc = write_config(work, dsn, [issuer], extra='log_level = "warning"').start()
        factory = LeafFactory(ca)
        print(f"pre-generating {2 * args.count:,} P-256 certificates ...", flush=True)
        api_ders = [factory.der() for _ in range(args.count)]
        import_ders = [factory.der() for _ in range(args.count)]
        bodies = [
            b"".join(api_ders[i : i + args.batch]) for i in range(0, len(api_ders), args.batch)
        ]
        try:
            api_rate, recorded = asyncio.run(
                batch_api_rate(proc.admin_url, proc.token, bodies, args.in_flight)
            )
        finally:
            proc.stop()
        assert recorded == args.count, (recorded, args.count)

        bundle = work / "bundle.pem"
        import base64

        with open(bundle, "wb") as fh:
            for der in import_ders:
                b64 = base64.encodebytes(der).replace(b"\n", b"")
                lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
                fh.write(
                    b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"
                )
        start = time.perf_counter()
        result = subprocess.run(
            [
                str(VENV_BIN / "ocsp-responder"),
                "import",
                "--config",
                str(proc.config_path),
                "--quiet",
                "--batch-size",
                str(args.batch),
                str(bundle),
            ],
            capture_output=True,
            text=True,
        )
        import_rate = args.count / (time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"import failed: {result.stdout}{result.stderr}")

        from cryptography import x509

        serials = [x509.load_der_x509_certificate(d).serial_number for d in api_ders + import_ders]
        in_store = asyncio.run(stored(dsn, serials))
        assert in_store == len(serials), (in_store, len(serials))

        sign_rate = raw_signing_rate()
        insert_rate = asyncio.run(raw_insert_rate(dsn, args.count, args.batch))
    finally:
        cluster.destroy()

    print(
        f"batch API : {api_rate:8,.0f} certificates/s  ({args.count:,} in batches of "
        f"{args.batch}, {args.in_flight} in flight)"
    )
    print(f"import    : {import_rate:8,.0f} certificates/s  (whole command, PEM bundle)")
    print(
        f"baseline  : {sign_rate:8,.0f} raw P-256 signatures/s (one core); "
        f"{insert_rate:,.0f} raw row pairs/s (same INSERTs, no signing)"
    )
    print(
        f"ratios    : batch API = {api_rate / sign_rate:.2f} x raw signing, "
        f"{api_rate / insert_rate:.2f} x raw insert; import = "
        f"{import_rate / sign_rate:.2f} x raw signing, {import_rate / insert_rate:.2f} x raw insert"
    )
    print(f"all {len(serials):,} certificates verified in the store (row + response)")


if __name__ == "__main__":
    main()
