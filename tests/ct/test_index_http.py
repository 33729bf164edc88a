"""End to end: fake CT logs -> `ocsp-responder serve` (follower inside) -> PostgreSQL -> HTTP.

Every answer for an indexed serial is checked with tests.support.check_response
(cryptography and `openssl ocsp`). The real fixture entries are answered through test
twins of the staging issuers (same subject Name, our key; see docs/ct-index.md, "Testing
with the real fixtures"): the real serials, timestamps and TBSCertificates, re-attributed
to a key we hold, served by our own log in both API forms.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from responder.store import serial_key
from signer.demo_ca import DemoCA, create_ca
from tests.support import (
    VENV_BIN,
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    issuer_files,
    write_config,
)

from .fakelog import FakeLog, FakeLogServer, Twin
from .index_support import (
    DER,
    ct_log_table,
    now_ms,
    precert_and_tbs,
    precert_signing_ca,
    spki_sha256,
    staging_certs,
    twin_ca,
    wait_until,
)
from .test_index import expected_fixture_serials

KINDS = ["static", "rfc6962"]


#: one client for all requests (a client per request costs an SSL context each)
HTTP = httpx.Client(timeout=30)


def post(url: str, der: bytes) -> httpx.Response:
    return HTTP.post(url, content=der, headers={"Content-Type": "application/ocsp-request"})


def ask(proc: ResponderProcess, issuer: IssuerFiles, serial: int) -> httpx.Response:
    return post(proc.url, build_request(None, issuer.ca.ca_cert, serial=serial))


def assert_answer(
    proc: ResponderProcess,
    issuer: IssuerFiles,
    serial: int,
    expect: str = "good",
    *,
    openssl: bool = True,
) -> None:
    resp = ask(proc, issuer, serial)
    assert resp.status_code == 200
    check_response(resp.content, issuer=issuer, serial=serial, expect=expect, openssl=openssl)


def assert_unauthorized(proc: ResponderProcess, issuer: IssuerFiles, serial: int) -> None:
    resp = ask(proc, issuer, serial)
    parsed = ocsp.load_der_ocsp_response(resp.content)
    assert parsed.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


class DB:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def rows(self, query: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def value(self, query: str, *args: object) -> object:
        rows = await self.rows(query, *args)
        return rows[0][0] if rows else None


def cli(proc: ResponderProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), *args, "--config", str(proc.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def responders() -> Iterator[list[ResponderProcess]]:
    started: list[ResponderProcess] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.mark.parametrize("kind", KINDS)
async def test_ct_only_serials_are_answered_and_never_unauthorized(
    fake_server: FakeLogServer,
    fake_log: FakeLog,
    database: str,
    ct_ca: DemoCA,
    ct_issuer: IssuerFiles,
    tmp_path: Path,
    responders: list[ResponderProcess],
    kind: str,
) -> None:
    log, db = fake_log, DB(database)
    if kind == "static":
        log.faults.gzip = "header"  # gzip-compressed tiles
    key_hash = spki_sha256(ct_ca.ca_cert)
    pcsa = precert_signing_ca(ct_ca)
    other = create_ca("p256", "Another CA")
    serials = iter(range(0x5100_0000, 0x5200_0000))
    others: list[int] = []

    def add(n: int) -> list[int]:
        """n entries of ours (x509, direct precert, precert via the signing CA), plus
        another CA's entries in between; returns our serials."""
        ours = []
        for i in range(n):
            serial, ts = next(serials), now_ms()
            if i % 3 == 0:
                final = ct_ca.issue_leaf("ct.test", serial=serial)
                log.add_x509(final.public_bytes(DER), [ct_ca.ca_cert.public_bytes(DER)], ts)
            elif i % 3 == 1:
                pre, tbs = precert_and_tbs(ct_ca, "ct.test", serial)
                log.add_precert(key_hash, tbs, pre, [], ts)
            else:
                pre, tbs = precert_and_tbs(ct_ca, "ct.test", serial, pcsa)
                log.add_precert(key_hash, tbs, pre, [pcsa.der], ts)
            ours.append(serial)
            if i % 4 == 0:
                foreign = next(serials)
                log.add_x509(other.issue_leaf("o.test", serial=foreign).public_bytes(DER), [], ts)
                others.append(foreign)
        return ours

    first = add(30)
    log.publish(0)
    extra = "ct_follow_in_serve = true\n" + ct_log_table(fake_server, kind, name="testlog")
    proc = write_config(tmp_path, database, [ct_issuer], extra=extra).start()
    responders.append(proc)
    # The CA's write happened for a third of them; it was lost for the rest.
    recorded = first[::3]
    for serial in recorded:
        assert proc.record(ct_ca.issue_leaf("ct.test", serial=serial)).status_code == 201
    lost = [s for s in first if s not in recorded]
    reserved = lost.pop()  # never asked before the request-path gap check below

    async def caught_up(n: int) -> bool:
        return await db.value("SELECT next_index FROM ct_logs") == n

    async def repaired(n: int) -> bool:
        return (
            await db.value("SELECT count(*) FROM coverage_gaps WHERE repaired_at IS NOT NULL") == n
        )

    log.publish()
    await wait_until(lambda: caught_up(len(log.entries)), what="the follower to catch up")
    await wait_until(lambda: repaired(len(lost) + 1), what="gap repair")
    gaps = await db.rows("SELECT serial, detected_by FROM coverage_gaps")
    assert sorted(bytes(g["serial"]) for g in gaps) == sorted(
        serial_key(s) for s in [*lost, reserved]
    )
    assert {g["detected_by"] for g in gaps} == {"ct-follower"}
    lag = await db.value("SELECT lag_seconds FROM ct_logs")
    assert isinstance(lag, float) and 0 <= lag < 60
    for serial in first:
        if serial != reserved:
            assert_answer(proc, ct_issuer, serial)
    for serial in others:  # another CA's serial asked under our issuer: not ours
        assert_unauthorized(proc, ct_issuer, serial)

    # The log grows while followed.
    grown = add(10)
    log.publish()
    await wait_until(lambda: caught_up(len(log.entries)), what="the grown log")
    for serial in grown:
        assert_answer(proc, ct_issuer, serial)

    # A checkpoint/STH with a bad signature: nothing is trusted, the position stays.
    log.faults.bad_signature = True
    untrusted = add(5)
    position = await db.value("SELECT next_index FROM ct_logs")
    log.publish()

    async def refused() -> bool:
        err = await db.value("SELECT last_error FROM ct_logs")
        return isinstance(err, str) and "SignatureError" in err

    await wait_until(refused, what="the bad signature to be refused")
    assert await db.value("SELECT next_index FROM ct_logs") == position
    for serial in untrusted:
        assert_unauthorized(proc, ct_issuer, serial)
    # Rate limits and unavailability on the next polls: retried, then caught up.
    head = "/checkpoint" if kind == "static" else "/ct/v1/get-sth"
    log.faults.failures = {head: [429, 503]}
    log.faults.bad_signature = False
    await wait_until(lambda: caught_up(len(log.entries)), what="recovery")
    assert await db.value("SELECT last_error FROM ct_logs") is None
    for serial in untrusted:
        assert_answer(proc, ct_issuer, serial)

    # Revoking a serial known only from CT works and is answered revoked at once.
    victim = lost[0]
    assert proc.revoke("ctca", victim).status_code == 201
    assert_answer(proc, ct_issuer, victim, expect="revoked")

    # The request path: a CT-only serial whose response is missing is signed on demand,
    # stored and counted as a gap (as if the follower's repair had not happened yet).
    await db.rows("DELETE FROM responses WHERE serial = $1", serial_key(reserved))
    await db.rows("DELETE FROM coverage_gaps WHERE serial = $1", serial_key(reserved))
    assert_answer(proc, ct_issuer, reserved)
    [gap] = await db.rows(
        "SELECT detected_by, repaired_at, leaf_index FROM coverage_gaps WHERE serial = $1",
        serial_key(reserved),
    )
    assert gap["detected_by"] == "request" and gap["repaired_at"] is not None
    assert gap["leaf_index"] is not None
    assert (
        await db.value("SELECT count(*) FROM responses WHERE serial = $1", serial_key(reserved))
        == 1
    )
    assert "coverage gap" in proc.log() and format(reserved, "x") in proc.log()

    if kind != "static":  # the commands below do not depend on the log's API form
        return

    # ct-status, human and JSON.
    status = cli(proc, "ct-status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    [entry] = doc["logs"]
    assert entry["name"] == "testlog" and entry["next_index"] == len(log.entries)
    assert entry["behind"] == 0 and entry["last_error"] is None
    all_gaps = len(lost) + 1 + len(grown) + len(untrusted)
    assert entry["gaps"] == all_gaps and entry["gaps_unrepaired"] == 0
    assert doc["gaps_by_issuer"]["ctca"] == {"gaps": all_gaps, "unrepaired": 0, "retired": 0}
    # the per-log count scans the whole CT index: only when asked (--counts)
    assert entry["indexed"] is None
    counted = json.loads(cli(proc, "ct-status", "--json", "--counts").stdout)
    assert counted["logs"][0]["indexed"] == len(first) + len(grown) + len(untrusted)
    table = cli(proc, "ct-status")
    assert table.returncode == 0 and "testlog" in table.stdout and "ctca" in table.stdout
    [row] = [line.split() for line in table.stdout.splitlines() if line.startswith("testlog")]
    assert row[7] == "-"  # name, next, size, behind, lag, "Ns ago", indexed

    # The audit asks about every indexed serial like a relying party: no violation.
    audit = cli(proc, "audit", "--url", proc.url, "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = json.loads(audit.stdout)
    indexed = len(first) + len(grown) + len(untrusted)
    assert report["checked"] == indexed and report["violations"] == []
    assert report["revoked"] == 1 and report["good"] == indexed - 1

    # Shutdown cancels the follower cleanly.
    proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()[-2000:]

    # A corrupted stored response (another serial's) is caught by the audit: exit 1.
    corrupted = lost[1]
    await db.rows(
        "UPDATE responses SET der = (SELECT der FROM responses WHERE serial = $2) "
        "WHERE serial = $1",
        serial_key(corrupted),
        serial_key(lost[2]),
    )
    # A negative serial in the index (no CA issues one; no OCSP request can carry it:
    # cryptography refuses to build one) is a violation, not a crash of the audit.
    await db.rows(
        "INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, logged_at) "
        "SELECT issuer_id, $1, log, 999999, entry_kind, logged_at FROM ct_index LIMIT 1",
        serial_key(-0x51),
    )
    fresh = write_config(tmp_path, database, [ct_issuer]).start()  # empty cache
    responders.append(fresh)
    audit = cli(fresh, "audit", "--url", fresh.url, "--json")
    assert audit.returncode == 1, audit.stdout + audit.stderr
    report = json.loads(audit.stdout)
    assert [(v["serial"], v["problem"]) for v in report["violations"]] == [
        ("-51", "unaskable-serial"),
        (format(corrupted, "x"), "wrong-certid"),
    ]
    human = cli(fresh, "audit", "--url", fresh.url, "--sample", "5")
    assert human.returncode in (0, 1) and "audited 5 indexed serials" in human.stdout


async def test_ct_follow_once_command(
    fake_server: FakeLogServer,
    fake_log: FakeLog,
    database: str,
    ct_ca: DemoCA,
    ct_issuer: IssuerFiles,
    tmp_path: Path,
) -> None:
    key_hash = spki_sha256(ct_ca.ca_cert)
    for serial in range(0x6100, 0x6106):
        pre, tbs = precert_and_tbs(ct_ca, "f.test", serial)
        fake_log.add_precert(key_hash, tbs, pre, [], now_ms())
    fake_log.publish()
    proc = write_config(
        tmp_path, database, [ct_issuer], extra=ct_log_table(fake_server, "static", name="cli")
    )
    done = cli(proc, "ct-follow", "--once", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["log"], result["indexed"], result["gaps"], result["repaired"]) == (
        "cli",
        6,
        6,
        6,
    )
    assert result["next_index"] == 6 and result["error"] is None
    fake_log.faults.bad_signature = True
    fake_log.add_precert(key_hash, tbs, pre, [], now_ms())
    fake_log.publish()
    failed = cli(proc, "ct-follow", "--once")
    assert failed.returncode == 1
    assert "cli: FAILED: SignatureError" in failed.stdout and "at 6/" in failed.stdout
    empty = write_config(tmp_path, database, [ct_issuer])
    none = cli(empty, "ct-follow", "--once")
    assert none.returncode == 1 and "no ct_logs configured" in none.stderr
    # Without --once it follows until SIGTERM, then exits cleanly.
    fake_log.faults.bad_signature = False
    follower = subprocess.Popen(
        [str(VENV_BIN / "ocsp-responder"), "ct-follow", "--config", str(proc.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        db = DB(database)

        async def caught_up() -> bool:
            return await db.value("SELECT next_index FROM ct_logs") == 7

        await wait_until(caught_up, timeout=30, what="ct-follow to index the 7th entry")
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(15) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


async def test_real_fixture_serials_answered_over_http_via_twins(
    fake_server: FakeLogServer,
    database: str,
    tmp_path: Path,
    responders: list[ResponderProcess],
) -> None:
    """All 1,024 real serials, followed from two logs (Static CT and RFC 6962), indexed
    under the right issuer and answered with a valid signed response."""
    files, rekey = twin_issuers(tmp_path)
    fake_server.log = fixture_log("twins.example/static", rekey)
    # (issuer, serial) -> leaf index: the precerts are re-signed by the twins
    want = expected_fixture_serials(fake_server.log, twin_certs(files))
    with FakeLogServer() as rfc_server:
        rfc_server.log = fixture_log("twins.example/rfc6962", rekey)
        extra = (
            "ct_follow_in_serve = true\n"
            # the fixture's certificates expired in 2025-2026: with the default retention
            # they are retired (answered unauthorized, never signed; see the test below)
            'expired_retention = "3650d"\n'
            + ct_log_table(fake_server, "static", name="static")
            + ct_log_table(rfc_server, "rfc6962", name="rfc6962")
        )
        proc = write_config(tmp_path, database, list(files.values()), extra=extra).start(60)
        responders.append(proc)
        db = DB(database)

        async def done() -> bool:
            rows = await db.rows("SELECT next_index FROM ct_logs")
            open_gaps = await db.value(
                "SELECT count(*) FROM coverage_gaps WHERE repaired_at IS NULL"
            )
            return [r["next_index"] for r in rows] == [1024, 1024] and open_gaps == 0

        await wait_until(done, timeout=60, what="both logs indexed and repaired")
    rows = await db.rows(
        "SELECT i.name, c.serial FROM ct_index c JOIN issuers i ON i.id = c.issuer_id"
    )
    got = {(r["name"], int.from_bytes(r["serial"], "big", signed=True)) for r in rows}
    assert got == set(want)
    assert await db.value("SELECT count(*) FROM coverage_gaps") == 1024

    # Every answer is checked with cryptography; every 16th also with `openssl ocsp`
    # (about 64, all four issuers: the subprocess costs ~0.1 s on a loaded machine).
    def check(numbered: tuple[int, tuple[str, int]]) -> None:
        i, (name, serial) = numbered
        assert_answer(proc, files[name], serial, openssl=i % 16 == 0)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, enumerate(sorted(want, key=lambda k: k[1]))))
    audit = cli(proc, "audit", "--url", proc.url, "--sample", "200")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "audited 200 indexed serials" in audit.stdout and "0 violations" in audit.stdout
    t0 = time.monotonic()
    proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0
    print(f"stopped in {time.monotonic() - t0:.1f}s")


def _kind(name: str) -> str:
    return "p384" if name.startswith("e") else "rsa2048"


def twin_issuers(tmp_path: Path) -> tuple[dict[str, IssuerFiles], dict[bytes, Twin]]:
    """Test twins of the four staging issuers (same names, our keys) and the key rewrite
    that makes the fixture's precertificates name them (and be signed by them)."""
    real = staging_certs()
    twins = {name: twin_ca(cert, _kind(name)) for name, cert in real.items()}
    files = {n: issuer_files(n, ca, tmp_path / "issuers") for n, ca in twins.items()}
    return files, {
        spki_sha256(real[n]): Twin(spki_sha256(twins[n].ca_cert), twins[n].ca_key) for n in real
    }


def twin_certs(files: dict[str, IssuerFiles]) -> dict[str, x509.Certificate]:
    return {n: f.ca.ca_cert for n, f in files.items()}


def fixture_log(origin: str, rekey: dict[bytes, Twin]) -> FakeLog:
    """A published log of the 1,024 real fixture entries, re-keyed to the twins."""
    log = FakeLog(origin)
    log.add_fixture_tiles(rekey=rekey)
    log.publish()
    return log


async def test_long_expired_fixture_serials_are_retired_not_signed(
    fake_server: FakeLogServer,
    database: str,
    tmp_path: Path,
    responders: list[ResponderProcess],
) -> None:
    """The real fixture's certificates expired in 2025-2026, far beyond the default
    retention (7 days): the follower indexes all 1,024 (known, with their notAfter) but
    signs nothing and records no coverage gap; the responder answers them `unauthorized`
    (retired) and `audit` does not count that as a violation."""
    files, rekey = twin_issuers(tmp_path)
    fake_server.log = fixture_log("twins.example/static", rekey)
    want = expected_fixture_serials(fake_server.log, twin_certs(files))
    extra = "ct_follow_in_serve = true\n" + ct_log_table(fake_server, "static", name="static")
    proc = write_config(tmp_path, database, list(files.values()), extra=extra).start(60)
    responders.append(proc)
    db = DB(database)

    async def done() -> bool:
        return await db.value("SELECT next_index FROM ct_logs") == 1024

    await wait_until(done, timeout=60, what="the log indexed")
    assert await db.value("SELECT count(*) FROM ct_index WHERE not_after IS NOT NULL") == 1024
    assert await db.value("SELECT count(*) FROM coverage_gaps") == 0
    assert await db.value("SELECT count(*) FROM responses") == 0
    for name, serial in sorted(want, key=lambda k: k[1])[::128]:
        assert_unauthorized(proc, files[name], serial)
    assert await db.value("SELECT count(*) FROM responses") == 0  # nothing signed on demand
    audit = cli(proc, "audit", "--url", proc.url)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "audited 0 indexed serials" in audit.stdout and "0 violations" in audit.stdout
