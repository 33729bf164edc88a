"""The 2025 incident, reproduced: issuance under migrations, crashes and terminated backends.

Several writers record certificates as fast as they can through the real admin API of
two real `ocsp-responder serve` processes (single and batch calls), for
``OCSP_CHAOS_SECONDS`` (default 30) while, at random moments:

  (a) `ocsp-responder migrate` runs: once the real migration that adds a column and an
      index to the busy ``certificates`` table (the database starts one version before
      it), and as no-op runs at other moments;
  (b) responder processes are SIGKILLed and restarted;
  (c) PostgreSQL backends are terminated with pg_terminate_backend;
  (d) PostgreSQL itself crashes once (immediate stop: no shutdown checkpoint) and restarts
      after 9-12 s, longer than the write retry budget, so some writes answer 503.

The cluster runs with fsync on and ``synchronous_commit = off`` as its *default*: an
acknowledgement that relied on the server default would be lost by the crash.

Every request's outcome is classified: acknowledged (201/200; per certificate for a
batch), or told it failed (503 with a JSON reason, or a connection error). Anything else
fails the test: there is no third state. Afterwards every acknowledged certificate must
be in the store with a valid signed good response, and a freshly started responder must
answer ``good`` for every one of them over HTTP (cryptography checks for all, openssl for
a sample): zero unknown, zero lost. Certificates told "failed" are then recorded again
(as a CA would) and must all succeed. Every 503'd serial must appear in an ERROR log line.

Longer run: ``OCSP_CHAOS_SECONDS=300 .venv/bin/python -m pytest -q -s tests/test_chaos_issuance.py``
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from responder.schema import MINIMUM_VERSION, REQUIRED_VERSION, migrate
from responder.store import serial_key
from signer.demo_ca import DemoCA, LeafFactory, create_ca
from signer.issuers import issuer_from_certificate
from signer.recording import format_serial
from tests.pgcluster import PgCluster, claim_port
from tests.support import (
    VENV_BIN,
    IssuerFiles,
    ResponderProcess,
    check_response,
    free_port,
    issuer_files,
    write_config,
)

CHAOS_SECONDS = float(os.environ.get("OCSP_CHAOS_SECONDS", "30"))
SINGLE_WRITERS = 4
BATCH_WRITERS = 1
BATCH_SIZE = 25
RESPONDERS = 2


def stable_port() -> int:
    """A free loopback port below the ephemeral range (32768+ on Linux): a server that is
    down for a while (crashed PostgreSQL, a killed responder) cannot have its port taken
    by some client connection's ephemeral port meanwhile and fail to come back."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if not claim_port(port):  # the cluster's and the responders' ports: all different
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


@dataclass
class Tally:
    """Every request's outcome, and every certificate's."""

    requests: Counter[str] = field(default_factory=Counter)
    acked: dict[int, bytes] = field(default_factory=dict)  # serial -> DER
    created: int = 0
    existing: int = 0
    failed: dict[int, bytes] = field(default_factory=dict)  # told "not recorded"
    failed_503: set[int] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)

    def ack(self, serial: int, der: bytes, created: bool) -> None:
        self.acked[serial] = der
        self.failed.pop(serial, None)
        if created:
            self.created += 1
        else:
            self.existing += 1


class Chaos:
    def __init__(
        self,
        cluster: PgCluster,
        dbname: str,
        responders: list[ResponderProcess],
        ca: DemoCA,
        deadline: float,
    ) -> None:
        self.cluster = cluster
        self.dbname = dbname
        self.responders = responders
        self.deadline = deadline
        self.tally = Tally()
        self.single = LeafFactory(ca)
        self.precert = LeafFactory(ca, precertificate=True)
        self.down: set[int] = set()
        self.rng = random.Random()
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def new_cert(self) -> tuple[int, bytes]:
        factory = self.precert if self.rng.random() < 0.1 else self.single
        serial = int.from_bytes(os.urandom(16), "big") >> 1 | (1 << 126)
        return serial, factory.der(serial)

    # --- writers (threads with plain keep-alive HTTP: httpx's ~2 ms of client CPU per
    # request would make the test, not the responders, the bottleneck) -------------------

    def post(
        self, conns: dict[int, http.client.HTTPConnection], path: str, body: bytes
    ) -> tuple[int, bytes] | None:
        index = self.rng.randrange(len(self.responders))
        target = self.responders[index]
        conn = conns.get(index)
        if conn is None:
            conn = conns[index] = http.client.HTTPConnection(
                "127.0.0.1", target.admin_port, timeout=60
            )
        try:
            conn.request(
                "POST", path, body=body, headers={"Authorization": f"Bearer {target.token}"}
            )
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            del conns[index]
            with self.lock:
                self.tally.requests[f"connection error ({type(exc).__name__})"] += 1
            time.sleep(0.02)
            return None

    def writer(self, batch: int) -> None:
        conns: dict[int, http.client.HTTPConnection] = {}
        while self.running():
            if batch == 1:
                serial, der = self.new_cert()
                self.classify(self.post(conns, "/v1/certificates", der), [(serial, der)])
            else:
                certs = [self.new_cert() for _ in range(batch)]
                body = b"".join(d for _, d in certs)
                self.classify(self.post(conns, "/v1/certificates:batch", body), certs)
        for conn in conns.values():
            conn.close()

    def classify(self, resp: tuple[int, bytes] | None, certs: list[tuple[int, bytes]]) -> None:
        """Acknowledged, or told it failed; anything else is a defect."""
        with self.lock:
            self._classify(resp, certs)

    def _classify(self, resp: tuple[int, bytes] | None, certs: list[tuple[int, bytes]]) -> None:
        t = self.tally
        if resp is None:
            for serial, der in certs:
                t.failed[serial] = der
            return
        status, raw = resp
        t.requests[str(status)] += 1
        if status in (200, 201):
            body = json.loads(raw)
            results = body.get("results", [body])
            if len(results) != len(certs):
                t.unexpected.append(f"{len(results)} results for {len(certs)} certificates")
                return
            for (serial, der), result in zip(certs, results, strict=True):
                if int(result["serial"], 16) != serial or result["status"] != "good":
                    t.unexpected.append(f"result does not match the certificate: {result}")
                    continue
                t.ack(serial, der, bool(result["created"]))
        elif status == 503 and json.loads(raw)["error"].startswith("not recorded"):
            for serial, der in certs:
                t.failed[serial] = der
                t.failed_503.add(serial)
        else:
            t.unexpected.append(f"HTTP {status}: {raw[:300]!r}")

    # --- chaos ---------------------------------------------------------------------------

    async def sleep_until(self, moment: float) -> None:
        await asyncio.sleep(max(0.0, moment - time.monotonic()))

    async def run_migrate(self, config: Path) -> None:
        """Until it succeeds: a run may meet the crashed server or a terminated backend."""
        while True:
            proc = await asyncio.create_subprocess_exec(
                str(VENV_BIN / "ocsp-responder"),
                "migrate",
                "--config",
                str(config),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await proc.communicate()
            if proc.returncode == 0:
                self.tally.events["migrate runs"] += 1
                if b"applied" in out:
                    self.tally.events["real migration applied"] += 1
                return
            assert b"Traceback" not in err, err.decode()
            self.tally.events["migrate runs failed (retried)"] += 1
            await asyncio.sleep(0.5)

    async def migrations(self, start: float, duration: float) -> None:
        config = self.responders[0].config_path
        await self.sleep_until(start + self.rng.uniform(0.15, 0.45) * duration)
        # the real one, on the busy table, by two deploy hosts at once
        await asyncio.gather(self.run_migrate(config), self.run_migrate(config))
        while self.running():
            await asyncio.sleep(self.rng.uniform(2, 6))
            if self.running():
                await self.run_migrate(config)  # no-op runs: lock, check, unlock

    async def kills(self) -> None:
        while self.running():
            await asyncio.sleep(self.rng.uniform(2, 5))
            if not self.running():
                return
            index = self.rng.randrange(len(self.responders))
            if index in self.down:
                continue
            self.down.add(index)
            victim = self.responders[index]
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.proc.wait)
            self.tally.events["responders SIGKILLed"] += 1
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            await asyncio.to_thread(start_until_up, victim, self.tally.events)
            self.down.discard(index)

    async def terminations(self) -> None:
        while self.running():
            await asyncio.sleep(self.rng.uniform(0.7, 2.5))
            try:
                conn = await asyncpg.connect(self.cluster.dsn(), timeout=3)
                try:
                    killed = await conn.fetchval(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM "
                        "(SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                        " AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                        " ORDER BY random() LIMIT 4) victims",
                        self.dbname,
                    )
                finally:
                    await conn.close()
                self.tally.events["backends terminated"] += int(killed)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                self.tally.events["terminations skipped (server down)"] += 1

    async def crash_once(self, start: float, duration: float) -> None:
        await self.sleep_until(start + self.rng.uniform(0.3, 0.7) * duration)
        await asyncio.to_thread(self.cluster.stop, "immediate")  # a crash: no checkpoint
        # down for longer than the writers' retry budget (RetryPolicy: 7 jittered sleeps
        # of 0.05 s doubling to 2 s, 2.6-7.7 s in all while the server refuses
        # connections): some writes must run out of retries and answer 503
        await asyncio.sleep(self.rng.uniform(9.0, 12.0))
        await asyncio.to_thread(start_postgres, self.cluster)
        self.tally.events["PostgreSQL crashed and restarted"] += 1


def start_postgres(cluster: PgCluster) -> None:
    for attempt in range(5):
        try:
            cluster.start()
            return
        except RuntimeError:
            if attempt == 4:
                log = cluster.root / "log"
                raise AssertionError(
                    "PostgreSQL did not restart:\n" + log.read_text()[-3000:]
                ) from None
            time.sleep(1)


def start_until_up(proc: ResponderProcess, events: Counter[str] | None = None) -> None:
    """A responder started while PostgreSQL is down exits; start it again until it runs.
    While it was down, its loopback port may have been taken as some connection's
    ephemeral port: then it moves to fresh ports (env overrides; writers follow)."""
    last = ""
    for _ in range(60):
        try:
            proc.start(timeout=20)
            return
        except (RuntimeError, TimeoutError) as exc:
            proc.stop(signal.SIGKILL)
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            if events is not None:
                events["responder restarts that failed (retried)"] += 1
            if "in use" in str(exc) or "failed to start" in str(exc):
                proc.port, proc.admin_port = free_port(), free_port()
                proc.env["OCSP_RESPONDER_LISTEN"] = f"127.0.0.1:{proc.port}"
                proc.env["OCSP_RESPONDER_ADMIN_LISTEN"] = f"127.0.0.1:{proc.admin_port}"
            time.sleep(0.5)
    raise AssertionError(f"responder did not come back: {last}")


async def check_store(dsn: str, acked: dict[int, bytes], ca: DemoCA) -> Counter[str]:
    """Every acknowledged serial has a certificate row and a valid signed good response."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.serial, r.der FROM certificates c JOIN responses r USING (issuer_id, serial) "
            "WHERE c.serial = ANY($1::bytea[])",
            [serial_key(s) for s in acked],
        )
    finally:
        await conn.close()
    found = {int.from_bytes(r["serial"], "big", signed=True): bytes(r["der"]) for r in rows}
    outcome: Counter[str] = Counter()
    outcome["missing from store"] = len(set(acked) - set(found))
    key = ca.responder_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    for serial, der in found.items():
        resp = ocsp.load_der_ocsp_response(der)
        key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
        ok = resp.serial_number == serial and resp.certificate_status == ocsp.OCSPCertStatus.GOOD
        outcome["stored good, signature valid" if ok else "stored but wrong"] += 1
    return outcome


def check_http(port: int, serials: list[int], ca: DemoCA, threads: int = 6) -> Counter[str]:
    """Ask a fresh responder about every serial (GET, SHA-1 CertID): all must be good."""
    name_hash, key_hash = issuer_from_certificate("x", ca.ca_cert).cert_id_hashes["sha1"]
    outcome: Counter[str] = Counter()
    lock = threading.Lock()
    queue = list(serials)

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local: Counter[str] = Counter()
        while True:
            with lock:
                if not queue:
                    break
                serial = queue.pop()
            req = (
                ocsp.OCSPRequestBuilder()
                .add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
                .build()
                .public_bytes(serialization.Encoding.DER)
            )
            conn.request("GET", "/" + quote(base64.b64encode(req).decode(), safe=""))
            resp = conn.getresponse()
            parsed = ocsp.load_der_ocsp_response(resp.read())
            if parsed.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                local[f"answered {parsed.response_status.name}"] += 1
            elif parsed.serial_number != serial:
                local["answered for another serial"] += 1
            else:
                local[f"answered {parsed.certificate_status.name.lower()}"] += 1
        conn.close()
        with lock:
            outcome.update(local)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return outcome


@pytest.fixture
def chaos_cluster() -> PgCluster:
    cluster = PgCluster({"fsync": "on", "full_page_writes": "on", "synchronous_commit": "off"})
    cluster.port = stable_port()
    cluster.init()
    cluster.start()
    try:
        yield cluster  # type: ignore[misc]
    finally:
        cluster.destroy()


def test_no_acknowledged_issuance_is_lost(chaos_cluster: PgCluster, tmp_path: Path) -> None:
    assert MINIMUM_VERSION < REQUIRED_VERSION, (
        "the chaos test migrates the busy table from the schema before the newest expand "
        "migration; the newest migration is not expand-only (see docs/migrations.md)"
    )
    chaos_cluster.psql("CREATE DATABASE chaos")
    dsn = chaos_cluster.dsn("chaos")
    asyncio.run(migrate(dsn, target=MINIMUM_VERSION))
    ca = create_ca("p256", "Chaos")
    issuer: IssuerFiles = issuer_files("chaos", ca, tmp_path, delegated=True)
    responders = [
        write_config(tmp_path, dsn, [issuer], port=stable_port(), admin_port=stable_port())
        for _ in range(RESPONDERS)
    ]
    for proc in responders:
        proc.start()
    start = time.monotonic()
    chaos = Chaos(chaos_cluster, "chaos", responders, ca, start + CHAOS_SECONDS)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        # writers get their own threads: in the default executor they would leave no
        # thread for restarting PostgreSQL while a responder restart waits for it
        loop.set_default_executor(ThreadPoolExecutor(max_workers=8))
        writers = ThreadPoolExecutor(max_workers=SINGLE_WRITERS + BATCH_WRITERS)
        await asyncio.gather(
            *(loop.run_in_executor(writers, chaos.writer, 1) for _ in range(SINGLE_WRITERS)),
            *(
                loop.run_in_executor(writers, chaos.writer, BATCH_SIZE)
                for _ in range(BATCH_WRITERS)
            ),
            chaos.migrations(start, CHAOS_SECONDS),
            chaos.kills(),
            chaos.terminations(),
            chaos.crash_once(start, CHAOS_SECONDS),
        )
        writers.shutdown()

    try:
        asyncio.run(run())
        elapsed = time.monotonic() - start
        logs = "".join(f.read_text() for f in tmp_path.glob("*.log"))  # every incarnation
    finally:
        for proc in responders:
            proc.stop(signal.SIGKILL)  # no graceful shutdown either
    tally = chaos.tally
    version = asyncio.run(_version(dsn))
    checks_started = time.monotonic()

    # the store, straight after the chaos: every acknowledgement is there
    phases: dict[str, float] = {}
    mark = time.monotonic()
    store = asyncio.run(check_store(dsn, tally.acked, ca))
    phases["store check"] = time.monotonic() - mark
    failed_but_committed = asyncio.run(_present(dsn, list(tally.failed)))
    logged_503 = sum(1 for s in tally.failed_503 if f"serial={format_serial(s)}" in logs)

    # a CA records what it was told had failed again; now without chaos that must work
    mark = time.monotonic()
    fresh = write_config(tmp_path, dsn, [issuer]).start()
    try:
        retried = list(tally.failed.items())
        for i in range(0, len(retried), 500):
            chunk = retried[i : i + 500]
            resp = fresh.record_batch(b"".join(d for _, d in chunk))
            assert resp.status_code == 200, resp.text
            for (serial, der), result in zip(chunk, resp.json()["results"], strict=True):
                tally.ack(serial, der, bool(result["created"]))
        fresh.stop()
        # a freshly started responder (empty cache) answers every acknowledged serial
        final = write_config(tmp_path, dsn, [issuer]).start()
        try:
            phases["re-record failed"] = time.monotonic() - mark
            mark = time.monotonic()
            answers = check_http(final.port, list(tally.acked), ca)
            phases["HTTP check"] = time.monotonic() - mark
            sample = random.sample(list(tally.acked.items()), min(10, len(tally.acked)))
            for serial, der in sample:
                cert = x509.load_der_x509_certificate(der)
                resp = httpx.post(
                    final.url,
                    content=ocsp.OCSPRequestBuilder()
                    .add_certificate(cert, ca.ca_cert, hashes.SHA1())
                    .build()
                    .public_bytes(serialization.Encoding.DER),
                    headers={"Content-Type": "application/ocsp-request"},
                )
                check_response(resp.content, issuer=issuer, serial=serial)
        finally:
            final.stop()
    finally:
        fresh.stop()

    acked_during = len(tally.acked) - len(retried)
    print(
        f"\nchaos: {elapsed:.0f}s (then {time.monotonic() - checks_started:.0f}s of checks), "
        f"schema {MINIMUM_VERSION} -> {version}\n"
        f"  requests by outcome: {dict(tally.requests)}\n"
        f"  certificates acknowledged during chaos: {acked_during} "
        f"(rate {acked_during / elapsed:.0f}/s)\n"
        f"  certificates told 'not recorded': {len(retried)} "
        f"(503: {len(tally.failed_503)}, of which in ERROR logs: {logged_503}; "
        f"committed anyway, ambiguous: {failed_but_committed}); all recorded on retry\n"
        f"  events: {dict(tally.events)}\n"
        f"  store check of acknowledged: {dict(store)}\n"
        f"  fresh responder over HTTP ({len(tally.acked)} serials): {dict(answers)}\n"
        f"  check phases (s): { {k: round(v, 1) for k, v in phases.items()} }\n"
        f"  created {tally.created}, already recorded {tally.existing}\n"
        f"  unexpected outcomes: {len(tally.unexpected)}; openssl-checked sample: {len(sample)}"
    )
    assert not tally.unexpected, tally.unexpected[:5]
    assert store["missing from store"] == 0 and store["stored but wrong"] == 0, store
    assert answers == Counter({"answered good": len(tally.acked)}), answers
    assert tally.failed_503, "the crash outlasted the retry budget, yet nobody heard 503"
    assert logged_503 == len(tally.failed_503)
    assert version == REQUIRED_VERSION
    assert tally.events["real migration applied"] <= 1  # 0: its output was lost to a crash
    assert tally.events["PostgreSQL crashed and restarted"] == 1
    assert tally.events["responders SIGKILLed"] >= 1
    assert tally.events["backends terminated"] >= 1
    assert acked_during > 0


async def _version(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT max(version) FROM schema_migrations"))
    finally:
        await conn.close()


async def _present(dsn: str, serials: list[int]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM certificates WHERE serial = ANY($1::bytea[])",
                [serial_key(s) for s in serials],
            )
        )
    finally:
        await conn.close()
