"""What on-demand signing with a token key does to a worker's event loop.

    .venv/bin/python benchmarks/token_loop_lag.py [--duration 3] [--concurrency 16]

Runs a real ``ResponderService`` in process (its own PostgreSQL unless $DATABASE_URL,
a P-256 delegated responder key inside SoftHSM2), and for each mode drives
``--concurrency`` coroutines asking, as fast as answers come, for a recorded serial
by a SHA-256 CertID with a nonce, with the response cache off (``cache_size = 0``), so
that every answer is signed on demand, twice: the response and its nonce echo. A 1 ms timer in the same loop measures how late it fires: that lateness is what
an answer from memory waits in this worker meanwhile. Modes, same run:

- ``in-loop``: the token signs inside the event loop (the code before token keys signed
  in a thread; obtained by hiding ``Issuer.token_signed``);
- ``thread``: as shipped.

Prints on-demand answers/s and the timer's p50/p99/max lateness. Needs softhsm2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from responder.config import load_config
from responder.protocol import parse_request
from responder.service import ResponderService
from signer.demo_ca import create_ca
from signer.issuers import Issuer
from tests.pgcluster import superuser_dsn
from tests.softhsm import SoftHSMToken
from tests.support import build_request, create_database, issuer_files, write_config


async def measure(service: ResponderService, ders: list[bytes], duration: float, conns: int):
    lateness: list[float] = []
    answers = 0
    stop = time.perf_counter() + duration

    async def ticker() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lateness.append(time.perf_counter() - t - 0.001)

    async def client(i: int) -> None:
        nonlocal answers
        n = i
        while time.perf_counter() < stop:
            await service.chain.response(parse_request(ders[n % len(ders)]))
            answers += 1
            n += conns

    await asyncio.gather(ticker(), *(client(i) for i in range(conns)))
    lateness.sort()
    ms = [x * 1000 for x in lateness]
    return answers / duration, statistics.median(ms), ms[int(len(ms) * 0.99)], ms[-1]


async def run(dsn: str, work: Path, duration: float, conns: int) -> None:
    token = SoftHSMToken.create(work / "softhsm")
    os.environ.update(token.env)
    files = issuer_files("bench-hsm", create_ca("p256", "Bench HSM P256"), work)
    token.import_key(files.directory / "responder.key", "bench-ocsp", "01")
    (files.directory / "responder.key").unlink()
    proc = write_config(work / "serve", dsn, [], extra="cache_size = 0\n")
    proc.config_path.write_text(
        proc.config_path.read_text()
        + f'[[issuers]]\nname = "{files.name}"\ncertificate = "{files.ca_pem}"\n'
        + f'responder_certificate = "{files.directory / "responder.pem"}"\n'
        + f'responder_key = "{token.uri("bench-ocsp")}"\n'
    )
    service = ResponderService(load_config(proc.config_path, {}))
    await service.start(pool_size=4, monitor=False)
    try:
        cert = files.ca.issue_leaf("bench.test")
        await service.recorder.record([cert])
        ders = [
            build_request(cert, files.ca.ca_cert, alg="sha256", nonce=secrets.token_bytes(16))
            for _ in range(64)
        ]
        real = Issuer.token_signed
        print(f"{'mode':8} {'answers/s':>10} {'lag p50':>8} {'p99':>8} {'max':>8}  (ms)")
        for mode in ("in-loop", "thread", "in-loop", "thread"):
            Issuer.token_signed = property(lambda self: False) if mode == "in-loop" else real  # type: ignore[method-assign,assignment]
            rate, p50, p99, worst = await measure(service, ders, duration, conns)
            print(f"{mode:8} {rate:10,.0f} {p50:8.2f} {p99:8.2f} {worst:8.2f}")
        Issuer.token_signed = real  # type: ignore[method-assign]
    finally:
        await service.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    with superuser_dsn() as admin, tempfile.TemporaryDirectory() as work:
        asyncio.run(run(create_database(admin), Path(work), args.duration, args.concurrency))


if __name__ == "__main__":
    main()
