"""The OCSP hot-path benchmark: one command, one run, ratios against baselines measured here.

    .venv/bin/python benchmarks/run.py [--duration 5] [--serials 100000] [--quick]

It starts its own PostgreSQL (tests/pgcluster.py), creates a P-256 and an RSA-2048 CA with
delegated responders, signs and COPYs >= 100,000 distinct pre-signed responses, records
serials without responses for on-demand signing, then measures with wrk (Debian package
``wrk``; ``apt-get install wrk``) driven by benchmarks/requests.lua over many pre-built
requests:

    a  pre-signed hit, GET            (warm in-process cache)
    b  pre-signed hit, POST
    c  store hit, cold cache          (cache_size = 0: every request reads PostgreSQL)
    d  on-demand signing, P-256 / RSA-2048 (known serials, no stored response; POST)
    e  unauthorized (unknown serials of a served issuer) and malformed (GET garbage)

at 16 and 64 connections, with ``serve --workers 1`` and then ``--workers 2``. Baselines
on the same requests in the same run: a bare uvicorn ASGI app returning fixed bytes (the
Python ceiling, same uvicorn settings), the responder's own HTTP server (responder/
ocsp_http.py) returning the same fixed bytes (benchmarks/bare_native.py: what its HTTP
layer alone costs), and ``openssl ocsp`` as an on-demand responder
(in a private network namespace: OpenSSL 3.0 binds every interface; a fresh process per
measurement because it spins on a connection closed without a request, openssl#31129).
Prints a table with ratios and writes benchmarks/results/bench-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import datetime as dt
import io
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.x509 import ocsp  # noqa: E402

from responder.config import load_config  # noqa: E402
from responder.store import PresignedStore, serial_key  # noqa: E402
from signer.demo_ca import DemoCA, create_ca  # noqa: E402
from signer.issuers import Issuer  # noqa: E402
from signer.response_builder import CertStatus, ValidityPolicy, sign_response  # noqa: E402
from tests.pgcluster import PgCluster, free_port  # noqa: E402
from tests.support import IssuerFiles, create_database, issuer_files  # noqa: E402

LUA = REPO / "benchmarks" / "requests.lua"
RESULTS = REPO / "benchmarks" / "results"
VENV_BIN = Path(sys.executable).parent
#: serial prefixes (top bits) so that each population is one bytea range
PRESIGNED_TOP, ONDEMAND_TOP, UNKNOWN_TOP = 0x40, 0x50, 0x60
WRK_THREADS = 2


# --- data ---------------------------------------------------------------------------


def make_serial(top: int, index: int) -> int:
    """A 127-bit serial whose top byte says which population it belongs to."""
    return (top << 119) | (secrets.randbits(64) << 32) | index


_worker_issuer: Issuer | None = None


def _init_signer(config_path: str, name: str) -> None:
    global _worker_issuer
    registry = load_config(Path(config_path)).load_issuers()
    _worker_issuer = registry.by_name(name)


def _sign_batch(serials: list[int]) -> list[tuple[int, bytes, int, int]]:
    assert _worker_issuer is not None
    policy = ValidityPolicy()
    out = []
    for serial in serials:
        signed = sign_response(_worker_issuer, serial, CertStatus.GOOD, policy)
        out.append((serial, signed.der, signed.this_update, signed.next_update))
    return out


def sign_presigned(
    config_path: Path, name: str, serials: list[int]
) -> list[tuple[int, bytes, int, int]]:
    """Real, distinct signed responses, signed in a process pool."""
    chunks = [serials[i : i + 2000] for i in range(0, len(serials), 2000)]
    out: list[tuple[int, bytes, int, int]] = []
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=os.cpu_count() or 2, initializer=_init_signer, initargs=(str(config_path), name)
    ) as pool:
        for batch in pool.map(_sign_batch, chunks):
            out.extend(batch)
    return out


async def load_database(
    dsn: str,
    config_path: Path,
    presigned: list[tuple[int, bytes, int, int]],
    ondemand: dict[str, list[int]],
) -> dict[str, int]:
    """Register issuers, COPY certificates and pre-signed responses in."""
    registry = load_config(config_path).load_issuers()
    store = await PresignedStore.connect(dsn, max_size=2)
    try:
        await store.register_issuers(registry.issuers)
        ids = {i.name: i.db_id for i in registry.issuers}
        # which certificate signed them, as the product records it: rows without it are
        # rollover work for the refresher, which would then re-sign them during the runs
        p256_signer = (
            next(i for i in registry.issuers if i.name == "p256").active_responder().fingerprint64
        )
        not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=90)
        cert_rows = [(ids["p256"], serial_key(s), not_after, 2) for s, _, _, _ in presigned]
        for name, serials in ondemand.items():
            cert_rows += [(ids[name], serial_key(s), not_after, 2) for s in serials]
        resp_rows = [
            (
                ids["p256"],
                serial_key(s),
                0,
                dt.datetime.fromtimestamp(t, dt.UTC),
                dt.datetime.fromtimestamp(n, dt.UTC),
                der,
                p256_signer,
            )
            for s, der, t, n in presigned
        ]
        async with store.pool.acquire() as conn:
            await conn.copy_records_to_table(
                "certificates",
                records=cert_rows,
                columns=["issuer_id", "serial", "not_after", "kinds"],
            )
            await conn.copy_records_to_table(
                "responses",
                records=resp_rows,
                columns=[
                    "issuer_id",
                    "serial",
                    "status",
                    "this_update",
                    "next_update",
                    "der",
                    "signer",
                ],
            )
            await conn.execute("ANALYZE")
        return ids
    finally:
        await store.close()


def ondemand_key_range() -> tuple[bytes, bytes]:
    """The stored-key range of the on-demand population (keys are DER INTEGER contents:
    a 127-bit serial's first byte is its top byte shifted right by one)."""
    first = serial_key(make_serial(ONDEMAND_TOP, 0))[0]
    return bytes([first]), bytes([first + 1])


async def reset_ondemand(dsn: str) -> None:
    """Forget responses written back by on-demand runs so the next run signs again."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DELETE FROM responses WHERE serial >= $1 AND serial < $2", *ondemand_key_range()
        )
    finally:
        await conn.close()


async def count_ondemand(dsn: str) -> int:
    """On-demand responses written back since the last reset: one per signed answer."""
    await asyncio.sleep(0.5)  # the last write-back batch
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM responses WHERE serial >= $1 AND serial < $2",
            *ondemand_key_range(),
        )
        return count
    finally:
        await conn.close()


def ocsp_request(ca: DemoCA, serial: int) -> bytes:
    from signer.issuers import issuer_from_certificate

    info = issuer_from_certificate("x", ca.ca_cert)
    name_hash, key_hash = info.cert_id_hashes["sha1"]
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, key_hash, serial, hashes.SHA1()
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


def write_requests(path: Path, method: str, payloads: list[bytes]) -> Path:
    """The wrk request file: "<method> <len>\\n<payload>" records."""
    with open(path, "wb") as f:
        for payload in payloads:
            if method == "GET":
                payload = b"/" + quote(base64.b64encode(payload).decode(), safe="").encode()
            f.write(b"%s %d\n" % (method.encode(), len(payload)))
            f.write(payload)
    return path


# --- processes and measuring --------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, from /proc (clock ticks)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """root and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


@dataclass
class Measurement:
    name: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    loadgen_cpu_s: float
    db_cpu_s: float
    errors: int
    requests: int
    #: wrk's error counts by kind (connect, read, write, status = non-2xx/3xx, timeout)
    error_kinds: dict[str, int] | None = None
    #: on-demand runs: responses written back / requests (1.0: every answer was signed)
    signed_share: float | None = None

    @property
    def cpu_us_per_request(self) -> float:
        """Server + PostgreSQL CPU per answered request, µs: the per-core cost (what the
        requests/s of a 2-core box shared with wrk hides)."""
        return (self.server_cpu_s + self.db_cpu_s) / max(1, self.requests) * 1e6

    def row(self) -> dict[str, object]:
        return {**self.__dict__, "cpu_us_per_request": round(self.cpu_us_per_request, 1)}


def run_wrk(
    url: str,
    requests_file: Path,
    connections: int,
    duration: float,
    timeout: str = "2s",
    no_probe: bool = False,
) -> tuple[dict[str, float], float]:
    """Run wrk; its JSON summary and its own CPU seconds (wait4 rusage)."""
    env = {
        **os.environ,
        **({"OCSP_BENCH_NO_PROBE": "1"} if no_probe else {}),
        "OCSP_BENCH_REQUESTS": str(requests_file),
        "OCSP_BENCH_THREADS": str(WRK_THREADS),
    }
    cmd = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout}",
        "-s",
        str(LUA),
        url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for line in output.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:]), usage.ru_utime + usage.ru_stime
    raise RuntimeError(f"wrk failed ({proc.returncode}):\n{output}")


def measure_once(
    name: str,
    url: str,
    requests_file: Path,
    connections: int,
    duration: float,
    server_pids: list[int],
    db_pids: list[int],
) -> Measurement:
    before, db_before = cpu_seconds(server_pids), tree_cpu(db_pids[0])
    spy = None
    if os.environ.get("OCSP_BENCH_PYSPY"):  # profile the last server process (a worker)
        out = Path(os.environ["OCSP_BENCH_PYSPY"]) / f"{name}-{connections}.txt"
        spy = subprocess.Popen(
            [
                str(VENV_BIN / "py-spy"),
                "record",
                "-p",
                str(server_pids[-1]),
                "-d",
                str(max(1, round(duration))),
                "-f",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    summary, wrk_cpu = run_wrk(url, requests_file, connections, duration)
    if spy is not None:
        spy.wait()
    after, db_after = cpu_seconds(server_pids), tree_cpu(db_pids[0])
    db = sum(cpu - db_before.get(pid, 0.0) for pid, cpu in db_after.items())
    return to_measurement(name, connections, summary, after - before, wrk_cpu, db)


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds per process of a tree (PostgreSQL forks a backend per connection)."""
    return {pid: cpu_seconds([pid]) for pid in process_tree(root)}


#: each figure is the best of this many back-to-back runs (set by --rounds): the machine
#: is shared, and the least disturbed run is the one that says what the code can do
ROUNDS = 3


def best_of(
    run: Callable[[], Measurement],
    before: Callable[[], None] | None = None,
    signed: Callable[[], int] | None = None,
) -> Measurement:
    """The round with the most requests/s (its latencies and CPU with it). ``before``
    runs before each round; ``signed`` counts the answers a round signed."""
    best = None
    for _ in range(ROUNDS):
        if before is not None:
            before()
        m = run()
        if signed is not None:
            m.signed_share = signed() / max(1, m.requests)
            if m.signed_share < 0.9:
                print(f"WARNING: {m.name} signed only {m.signed_share:.0%} of its answers")
        if best is None or m.rps > best.rps:
            best = m
    assert best is not None
    return best


def measure(
    *args: Any,
    before: Callable[[], None] | None = None,
    signed: Callable[[], int] | None = None,
) -> Measurement:
    return best_of(lambda: measure_once(*args), before, signed)


def measure_openssl(*args: Any) -> Measurement:
    return best_of(lambda: measure_openssl_once(*args))


def to_measurement(
    name: str, connections: int, s: dict[str, float], server_cpu: float, wrk_cpu: float, db: float
) -> Measurement:
    errors = int(
        s["connect_errors"]
        + s["read_errors"]
        + s["write_errors"]
        + s["status_errors"]
        + s["timeouts"]
    )
    return Measurement(
        name=name,
        connections=connections,
        rps=s["requests"] / (s["duration_us"] / 1e6),
        p50_ms=s["p50_us"] / 1000,
        p99_ms=s["p99_us"] / 1000,
        max_ms=s["max_us"] / 1000,
        server_cpu_s=round(server_cpu, 2),
        loadgen_cpu_s=round(wrk_cpu, 2),
        db_cpu_s=round(db, 2),
        errors=errors,
        requests=int(s["requests"]),
        error_kinds={
            kind: int(s[key])
            for kind, key in (
                ("connect", "connect_errors"),
                ("read", "read_errors"),
                ("write", "write_errors"),
                ("status", "status_errors"),
                ("timeout", "timeouts"),
            )
            if s[key]
        },
    )


class Responder:
    """`ocsp-responder serve --workers N` as a subprocess."""

    def __init__(self, config: Path, workers: int, log: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            **env,
            "OCSP_RESPONDER_LISTEN": f"127.0.0.1:{self.port}",
            "OCSP_RESPONDER_ADMIN_LISTEN": "",
        }
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "ocsp-responder"),
                "serve",
                "--config",
                str(config),
                "--workers",
                str(workers),
            ],
            stdout=open(log, "ab"),  # noqa: SIM115 (lives as long as the process)
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"responder exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError("responder did not become ready")
        time.sleep(0.5 * workers)  # let every worker accept

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class BareServer:
    """A baseline server answering fixed bytes: bare uvicorn (the Python ceiling the issue
    names) or the responder's own HTTP protocol with an endpoint that does nothing."""

    def __init__(self, body: Path, log: Path, *, native: bool = False) -> None:
        self.port = free_port()
        uvicorn_args = [
            "-m",
            "uvicorn",
            "benchmarks.bare_app:app",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--no-access-log",
            "--lifespan",
            "off",
            "--no-server-header",
            "--log-level",
            "warning",
        ]
        native_args = ["-m", "benchmarks.bare_native", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, *(native_args if native else uvicorn_args)],
            cwd=REPO,
            env={**os.environ, "OCSP_BENCH_BODY": str(body), "PYTHONPATH": str(REPO)},
            stdout=open(log, "ab"),  # noqa: SIM115 (lives as long as the process)
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                httpx.get(self.url + "/x", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError("bare baseline server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# --- openssl ocsp inside a private network namespace --------------------------------


def openssl_inner(spec_path: str) -> None:
    """Runs inside `unshare -n`: loopback up, fresh openssl, probe, wrk, print JSON."""
    spec = json.loads(Path(spec_path).read_text())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    port = 18080
    proc = subprocess.Popen(
        [
            "openssl",
            "ocsp",
            "-index",
            spec["index"],
            "-port",
            str(port),
            "-rsigner",
            spec["rsigner"],
            "-rkey",
            spec["rkey"],
            "-CA",
            spec["ca"],
            "-ndays",
            "4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    probe = Path(spec["probe"]).read_bytes()
    try:
        for _ in range(200):
            try:
                # a real request: a bare connect-and-close would make it spin (openssl#31129)
                r = httpx.post(
                    url + "/",
                    content=probe,
                    timeout=2,
                    headers={"content-type": "application/ocsp-request"},
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        before = cpu_seconds([proc.pid])
        summary, wrk_cpu = run_wrk(
            url + "/", Path(spec["requests"]), spec["connections"], spec["duration"], no_probe=True
        )
        after = cpu_seconds([proc.pid])
    finally:
        proc.kill()
        proc.wait()
    print("RESULT " + json.dumps({"summary": summary, "server": after - before, "wrk": wrk_cpu}))


def measure_openssl_once(
    name: str,
    work: Path,
    files: IssuerFiles,
    index: Path,
    requests_file: Path,
    probe: bytes,
    connections: int,
    duration: float,
    db_pids: list[int],
) -> Measurement:
    spec = work / f"openssl-{name}-{connections}.json"
    probe_path = work / f"probe-{name}.der"
    probe_path.write_bytes(probe)
    spec.write_text(
        json.dumps(
            {
                "index": str(index),
                "rsigner": str(files.directory / "responder.pem"),
                "rkey": str(files.directory / "responder.key"),
                "ca": str(files.ca_pem),
                "requests": str(requests_file),
                "connections": connections,
                "duration": duration,
                "probe": str(probe_path),
            }
        )
    )
    out = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            str(Path(__file__).resolve()),
            "--openssl-inner",
            str(spec),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 120,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            return to_measurement(name, connections, r["summary"], r["server"], r["wrk"], 0.0)
    raise RuntimeError(f"openssl measurement failed:\n{out.stdout}\n{out.stderr}")


def write_index(path: Path, serials: list[int]) -> Path:
    expiry = (dt.datetime.now(dt.UTC) + dt.timedelta(days=90)).strftime("%y%m%d%H%M%SZ")
    with open(path, "w") as f:
        for s in serials:
            f.write(f"V\t{expiry}\t\t{s:X}\tunknown\t/CN=bench\n")
    # many entries share one subject: openssl's index must not insist on unique names
    Path(str(path) + ".attr").write_text("unique_subject = no\n")
    return path


# --- cache memory -------------------------------------------------------------------


def measure_cache_memory(entries: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cache_memory.py"), "--entries", str(entries)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise RuntimeError(out.stdout + out.stderr)


# --- main ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--serials", type=int, default=100_000, help="pre-signed responses")
    ap.add_argument("--ondemand", type=int, default=150_000, help="known P-256 serials, unsigned")
    ap.add_argument("--connections", default="16,64")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--cache-entries", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3, help="best of N runs per figure")
    ap.add_argument("--only", default="", help="comma list of scenario keys (default: all)")
    ap.add_argument("--no-openssl", action="store_true", help="skip the openssl baseline")
    ap.add_argument("--openssl-inner", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.openssl_inner:
        openssl_inner(args.openssl_inner)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    global ROUNDS
    ROUNDS = max(1, args.rounds)
    conns = [int(c) for c in args.connections.split(",")]
    only = set(filter(None, args.only.split(",")))

    def wanted(key: str) -> bool:
        return not only or key in only

    workers_list = [int(w) for w in args.workers.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ocsp-bench-"))
    log = work / "responder.log"
    print(f"work directory: {work}", flush=True)
    cluster = (
        PgCluster(settings={"max_connections": "300", "shared_buffers": "256MB"}).init().start()
    )
    results: list[Measurement] = []
    try:
        t0 = time.monotonic()
        dsn = create_database(cluster.dsn())
        db_pids = process_tree(int((cluster.datadir / "postmaster.pid").read_text().split()[0]))
        p256 = issuer_files("p256", create_ca("p256", "Bench P256"), work, delegated=True)
        rsa = issuer_files("rsa", create_ca("rsa2048", "Bench RSA"), work, delegated=True)
        config = work / "responder.toml"
        config.write_text(
            f'database_url = "{dsn}"\ndata_dir = "{work}"\nadmin_listen = ""\n'
            + p256.config_table()
            + rsa.config_table()
        )
        presigned_serials = [make_serial(PRESIGNED_TOP, i) for i in range(args.serials)]
        ondemand = {
            "p256": [make_serial(ONDEMAND_TOP, i) for i in range(args.ondemand)],
            "rsa": [make_serial(ONDEMAND_TOP, i) for i in range(max(args.ondemand // 5, 1000))],
        }
        print(f"signing {len(presigned_serials)} responses...", flush=True)
        presigned = sign_presigned(config, "p256", presigned_serials)
        asyncio.run(load_database(dsn, config, presigned, ondemand))
        print(f"data ready in {time.monotonic() - t0:.1f}s", flush=True)

        # request files
        hot = presigned_serials[:20_000]
        req = {
            "a_get": write_requests(work / "a.req", "GET", [ocsp_request(p256.ca, s) for s in hot]),
            "b_post": write_requests(
                work / "b.req", "POST", [ocsp_request(p256.ca, s) for s in hot]
            ),
            "c_store_get": write_requests(
                work / "c.req", "GET", [ocsp_request(p256.ca, s) for s in presigned_serials]
            ),
            "d_p256_post": write_requests(
                work / "d1.req", "POST", [ocsp_request(p256.ca, s) for s in ondemand["p256"]]
            ),
            "d_rsa_post": write_requests(
                work / "d2.req", "POST", [ocsp_request(rsa.ca, s) for s in ondemand["rsa"]]
            ),
            "e_unauthorized_get": write_requests(
                work / "e1.req",
                "GET",
                [ocsp_request(p256.ca, make_serial(UNKNOWN_TOP, i)) for i in range(20_000)],
            ),
            "e_malformed_get": write_requests(
                work / "e2.req", "GET", [secrets.token_bytes(60) for _ in range(20_000)]
            ),
        }
        body = work / "body.der"
        body.write_bytes(presigned[0][1])
        index = {
            "p256": write_index(work / "p256-index.txt", ondemand["p256"]),
            "rsa": write_index(work / "rsa-index.txt", ondemand["rsa"]),
        }

        # baselines
        for kind in ("uvicorn", "native"):
            bare = BareServer(body, work / "bare.log", native=kind == "native")
            try:
                for c in conns:
                    for key in ("a_get", "b_post"):
                        m = measure(
                            f"bare_{kind}_{key[2:]}",
                            bare.url,
                            req[key],
                            c,
                            args.duration,
                            [bare.proc.pid],
                            db_pids,
                        )
                        results.append(m)
                        print(format_row(m), flush=True)
            finally:
                bare.stop()
        for c in conns if not args.no_openssl else []:
            for name, files, key in (("p256", p256, "d_p256_post"), ("rsa", rsa, "d_rsa_post")):
                if not wanted(key):
                    continue
                m = measure_openssl(
                    f"openssl_ocsp_{name}",
                    work,
                    files,
                    index[name],
                    req[key],
                    ocsp_request(files.ca, ondemand[name][-1]),
                    c,
                    args.duration,
                    db_pids,
                )
                results.append(m)
                print(format_row(m), flush=True)

        for workers in workers_list:
            mark = log.stat().st_size if log.exists() else 0
            warm = Responder(config, workers, log, {})
            try:
                wait_for_warmup(log, mark, workers)
                run_wrk(warm.url, req["a_get"], 16, 1)  # the memo of parsed requests
                run_wrk(warm.url, req["b_post"], 16, 1)
                for c in conns:
                    for key in ("a_get", "b_post", "e_unauthorized_get", "e_malformed_get"):
                        if not wanted(key):
                            continue
                        m = measure(
                            f"w{workers}_{key}",
                            warm.url,
                            req[key],
                            c,
                            args.duration,
                            warm.pids(),
                            db_pids,
                        )
                        results.append(m)
                        print(format_row(m), flush=True)
            finally:
                warm.stop()
            cold = Responder(
                config,
                workers,
                log,
                {"OCSP_RESPONDER_CACHE_SIZE": "0", "OCSP_RESPONDER_WARMUP_RESPONSES": "0"},
            )
            try:
                for c in conns:
                    for key in ("c_store_get", "d_p256_post", "d_rsa_post"):
                        if not wanted(key):
                            continue
                        m = measure(
                            f"w{workers}_{key}",
                            cold.url,
                            req[key],
                            c,
                            args.duration,
                            cold.pids(),
                            db_pids,
                            before=(lambda: asyncio.run(reset_ondemand(dsn)))
                            if key.startswith("d_")
                            else None,
                            signed=(lambda: asyncio.run(count_ondemand(dsn)))
                            if key.startswith("d_")
                            else None,
                        )
                        results.append(m)
                        print(format_row(m), flush=True)
            finally:
                cold.stop()
        memory = measure_cache_memory(args.cache_entries) if args.cache_entries else {}
    finally:
        cluster.destroy()
    report(results, memory, args)
    if not os.environ.get("OCSP_BENCH_KEEP"):
        shutil.rmtree(work, ignore_errors=True)


def wait_for_warmup(log: Path, offset: int, workers: int, timeout: float = 120) -> None:
    """Until every worker logged that its warm-up loaded the pre-signed responses."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            if f.read().count(b"warm-up: ") >= workers:
                return
        time.sleep(0.2)
    raise TimeoutError("warm-up did not finish")


def format_row(m: Measurement) -> str:
    return (
        f"{m.name:<28} c={m.connections:<3} {m.rps:>9.0f} req/s  p50 {m.p50_ms:6.2f}  "
        f"p99 {m.p99_ms:6.2f}  max {m.max_ms:7.2f} ms  cpu srv {m.server_cpu_s:5.2f} "
        f"wrk {m.loadgen_cpu_s:5.2f} db {m.db_cpu_s:5.2f}  err {m.errors}"
        + (f"  signed {m.signed_share:.0%}" if m.signed_share is not None else "")
    )


def report(results: list[Measurement], memory: dict[str, float], args: argparse.Namespace) -> None:
    by = {(m.name, m.connections): m for m in results}

    def rps(name: str, c: int) -> float:
        m = by.get((name, c))
        return m.rps if m else float("nan")

    out = io.StringIO()
    out.write(
        f"\nOCSP responder benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
        f", best of {ROUNDS} runs of {args.duration:.0f}s per figure\n\n"
    )
    out.write(
        "| scenario | conns | req/s | vs baseline | p50 ms | p99 ms | max ms | server CPU s "
        "| wrk CPU s | db CPU s | server+db CPU µs/req | errors |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for m in results:
        base = ""
        if m.name.endswith(("a_get", "b_post")) and not m.name.startswith("w2_"):
            form = "get" if m.name.endswith("a_get") else "post"
            base = (
                f"{m.rps / rps(f'bare_uvicorn_{form}', m.connections):.2f}x bare uvicorn, "
                f"{m.rps / rps(f'bare_native_{form}', m.connections):.2f}x bare native"
            )
        elif "d_p256" in m.name:
            base = f"{m.rps / rps('openssl_ocsp_p256', m.connections):.2f}x openssl"
        elif "d_rsa" in m.name:
            base = f"{m.rps / rps('openssl_ocsp_rsa', m.connections):.2f}x openssl"
        elif m.name.startswith("w2_"):
            one = rps("w1_" + m.name[3:], m.connections)
            base = f"{m.rps / one:.2f}x w1"
        if m.signed_share is not None:
            base += f", {m.signed_share:.0%} signed"
        out.write(
            f"| {m.name} | {m.connections} | {m.rps:,.0f} | {base} | {m.p50_ms:.2f} | "
            f"{m.p99_ms:.2f} | {m.max_ms:.2f} | {m.server_cpu_s:.2f} | {m.loadgen_cpu_s:.2f} | "
            f"{m.db_cpu_s:.2f} | {m.cpu_us_per_request:.0f} | {m.errors} |\n"
        )
    memory = memory or {"entries": 0, "rss_mib": float("nan"), "bytes_per_entry": float("nan")}
    out.write(
        f"\ncache memory: {memory['entries']:,} entries, RSS {memory['rss_mib']:.0f} MiB "
        f"({memory['bytes_per_entry']:.0f} bytes/entry incl. interpreter)\n"
    )
    targets = []
    for c in args_conns(args):
        for key, base in (("a_get", "bare_uvicorn_get"), ("b_post", "bare_uvicorn_post")):
            ratio = rps(f"w1_{key}", c) / rps(base, c)
            targets.append(
                (
                    f"pre-signed {key[2:]} 1 worker >= 0.8x bare (c={c})",
                    ratio >= 0.8,
                    f"{ratio:.2f}x",
                )
            )
        ratio = rps("w1_d_p256_post", c) / rps("openssl_ocsp_p256", c)
        ours, theirs = by.get(("w1_d_p256_post", c)), by.get(("openssl_ocsp_p256", c))
        per_core = (
            f"; CPU per answer {ours.cpu_us_per_request:.0f} µs (server + PostgreSQL) vs "
            f"openssl {theirs.cpu_us_per_request:.0f} µs"
            if ours and theirs
            else ""
        )
        targets.append(
            (
                f"on-demand P-256 1 worker >= 1.5x openssl (c={c})",
                ratio >= 1.5,
                f"{ratio:.2f}x{per_core}",
            )
        )
        v = rps("w1_c_store_get", c)
        targets.append(
            (f"store hit cold cache >= 5000/s per worker (c={c})", v >= 5000, f"{v:,.0f}/s")
        )
    for key, base in (("a_get", "bare_uvicorn_get"), ("b_post", "bare_uvicorn_post")):
        m, b = by.get((f"w1_{key}", 64)), by.get((base, 64))
        if m:
            ceiling = f" (bare uvicorn: {b.p99_ms:.2f} ms)" if b else ""
            targets.append(
                (
                    f"p99 < 5 ms at 64 conns, pre-signed {key[2:]}",
                    m.p99_ms < 5,
                    f"{m.p99_ms:.2f} ms{ceiling}",
                )
            )
    for c in args_conns(args):
        for key in ("a_get", "b_post", "c_store_get", "d_p256_post"):
            one, two = rps(f"w1_{key}", c), rps(f"w2_{key}", c)
            if one == one and two == two:  # both measured
                targets.append(
                    (
                        f"2 workers vs 1, {key} (c={c}; 2 cores shared with wrk, PostgreSQL)",
                        two > one,
                        f"{two / one:.2f}x",
                    )
                )
    targets.append(
        (
            "1M cached responses <= 1 GiB RSS",
            memory["rss_mib"] <= 1024,
            f"{memory['rss_mib']:.0f} MiB",
        )
    )
    out.write("\n| target | met | measured |\n|---|---|---|\n")
    for name, ok, value in targets:
        out.write(f"| {name} | {'yes' if ok else 'NO'} | {value} |\n")
    text = out.getvalue()
    print(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"bench-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "machine": {
                    "node": platform.node(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "when": stamp,
                "args": vars(args),
                "results": [m.row() for m in results],
                "cache_memory": memory,
                "targets": [{"target": n, "met": ok, "measured": v} for n, ok, v in targets],
                "table": text,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


def args_conns(args: argparse.Namespace) -> list[int]:
    return [int(c) for c in args.connections.split(",")]


if __name__ == "__main__":
    main()
