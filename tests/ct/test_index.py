"""The follower runner into a real PostgreSQL, over real HTTP from the fake log.

The real fixture entries (1,024 Let's Encrypt staging precertificates) are indexed with
the real staging issuers configured by certificate: every (issuer, serial) must land under
the issuer that an independent check (cryptography verifying the precertificate's
signature) names. Their keys are not ours, so those gaps stay open: the HTTP answers for
those serials are shown in test_index_http.py with test twins of the issuers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Iterator
from types import SimpleNamespace

import asyncpg
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from prometheus_client import REGISTRY

from responder.config import CTLogConfig
from responder.ct import LogFollower, RetryPolicy
from responder.ct_index_store import CTIndexStore
from responder.ct_indexer import CTIndexer, PollResult
from responder.ct_status import EXIT_LOG_ERROR, EXIT_OPEN_GAPS, collect, exit_status
from responder.store import CertificateRecord, serial_from_key, serial_key
from signer.demo_ca import DemoCA, create_ca
from signer.response_builder import CertStatus, Revocation, ValidityPolicy, sign_response
from tests.support import IssuerFiles, check_response

from .fakelog import FakeLog, FakeLogServer
from .index_support import (
    DER,
    FAST,
    bare_registry,
    connect,
    now_ms,
    precert_and_tbs,
    precert_signing_ca,
    signing_registry,
    staging_certs,
)
from .pki import CA, make_ca

KINDS = ["static", "rfc6962"]
POLICY = ValidityPolicy()


def log_config(srv: FakeLogServer, kind: str, name: str = "fake", batch: int = 256) -> CTLogConfig:
    return CTLogConfig(
        name=name,
        url=srv.url,
        kind=kind,
        public_key=srv.log.public_key_pem.decode(),
        poll_interval=dt.timedelta(seconds=1),
        origin=srv.log.origin,
        batch_size=batch,
    )


def expected_fixture_serials(
    log: FakeLog, certs: dict[str, x509.Certificate] | None = None
) -> dict[tuple[str, int], int]:
    """(issuer name, serial) -> leaf index, found without the code under test: load each
    precertificate with cryptography and find the issuer (default: the staging issuers;
    test twins for a re-keyed log) whose key signed it."""
    certs = certs or staging_certs()
    out: dict[tuple[str, int], int] = {}
    for index, entry in enumerate(log.entries):
        n = int.from_bytes(entry.tail[:3], "big")
        pre = x509.load_der_x509_certificate(entry.tail[3 : 3 + n])
        signers = []
        for name, cert in certs.items():
            try:
                pre.verify_directly_issued_by(cert)
            except (InvalidSignature, ValueError, TypeError):
                continue
            signers.append(name)
        assert len(signers) == 1
        out.setdefault((signers[0], pre.serial_number), index)
    return out


def expected_not_after(log: FakeLog) -> dict[int, dt.datetime]:
    """serial -> notAfter of each fixture precertificate, read by cryptography."""
    out = {}
    for entry in log.entries:
        n = int.from_bytes(entry.tail[:3], "big")
        pre = x509.load_der_x509_certificate(entry.tail[3 : 3 + n])
        out[pre.serial_number] = pre.not_valid_after_utc
    return out


async def index_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT i.name, c.serial, c.leaf_index, c.entry_kind, c.log "
            "FROM ct_index c JOIN issuers i ON i.id = c.issuer_id"
        )
    finally:
        await conn.close()


async def fetch(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def gap_metric(issuer: str) -> float:
    return REGISTRY.get_sample_value("coverage_gaps_total", {"issuer": issuer}) or 0.0


@pytest.mark.parametrize("kind", KINDS)
async def test_real_fixture_every_serial_indexed_under_its_issuer(
    fake_server: FakeLogServer, fixture_log: FakeLog, database: str, kind: str
) -> None:
    want = expected_fixture_serials(fixture_log)
    assert len(want) == 1024
    registry = bare_registry(staging_certs())
    store = await connect(database, registry)
    before = {n: gap_metric(n) for n in ("e5", "e6", "r10", "r11")}
    try:
        indexer = CTIndexer(
            [log_config(fake_server, kind, batch=300)], registry, store.pool, POLICY, retry=FAST
        )
        [result] = await indexer.run_once()
        assert result.error is None and result.indexed == 1024
        assert (result.next_index, result.tree_size) == (1024, 1024)
        rows = await index_rows(database)
        got = {(r["name"], serial_from_key(r["serial"])): r["leaf_index"] for r in rows}
        assert len(rows) == 1024 and got == want
        assert {r["entry_kind"] for r in rows} == {1}  # precert_entry
        # each row keeps its precertificate's notAfter (migration 0005), as cryptography
        # reads it from the submitted precertificate
        not_after = {
            serial_from_key(r["serial"]): r["not_after"]
            for r in await fetch(database, "SELECT serial, not_after FROM ct_index")
        }
        assert not_after == expected_not_after(fixture_log)
        # No key of ours: every serial is an open gap, counted once per serial.
        gaps = await fetch(database, "SELECT repaired_at, detected_by FROM coverage_gaps")
        assert len(gaps) == 1024 and all(g["repaired_at"] is None for g in gaps)
        assert {g["detected_by"] for g in gaps} == {"ct-follower"}
        assert sum(gap_metric(n) - before[n] for n in before) == 1024
        # Polling again: nothing new, no duplicates, nothing counted twice.
        [again] = await indexer.run_once()
        assert again.error is None and again.indexed == 0 and again.gaps == 0
        assert len(await index_rows(database)) == 1024
        pos = await fetch(database, "SELECT next_index, tree_size, state FROM ct_logs")
        assert [(p["next_index"], p["tree_size"]) for p in pos] == [(1024, 1024)]
        await indexer.aclose()
    finally:
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_restart_resumes_without_gap_or_duplicate(
    fake_server: FakeLogServer, fixture_log: FakeLog, database: str, kind: str
) -> None:
    """An entry that does not match its hash stops the follower; what committed before
    stays, the position is exactly after it, and a new process resumes there."""
    registry = bare_registry(staging_certs())
    store = await connect(database, registry)
    try:
        cfg = log_config(fake_server, kind, batch=200)
        fixture_log.faults.tamper = {700}
        first = CTIndexer([cfg], registry, store.pool, POLICY, retry=FAST)
        [r1] = await first.run_once()
        await first.aclose()
        assert r1.error is not None and ("Mismatch" in r1.error or "Proof" in r1.error)
        [pos] = await fetch(database, "SELECT next_index, last_error FROM ct_logs")
        committed = pos["next_index"]
        assert 0 < committed <= 700 and pos["last_error"]
        leaves = sorted(r["leaf_index"] for r in await index_rows(database))
        assert leaves == list(range(committed))  # every entry is ours: no hole, no extra
        # "Restart": a new indexer (new follower) from the stored position.
        fixture_log.faults.tamper = set()
        fixture_log.requests.clear()
        second = CTIndexer([cfg], registry, store.pool, POLICY, retry=FAST)
        [r2] = await second.run_once()
        await second.aclose()
        assert r2.error is None and r2.indexed == 1024 - committed
        leaves = sorted(r["leaf_index"] for r in await index_rows(database))
        assert leaves == list(range(1024))
        if kind == "static":
            assert "/tile/data/000" not in fixture_log.requests  # resumed, not restarted
        [pos] = await fetch(database, "SELECT next_index, last_error FROM ct_logs")
        assert pos["next_index"] == 1024 and pos["last_error"] is None
    finally:
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_start_index_skips_the_backlog_before_it_and_nothing_else(
    fake_server: FakeLogServer, fixture_log: FakeLog, database: str, kind: str
) -> None:
    """An operator whose follower is stuck in a backlog sets start_index: the follower
    jumps there once, indexes everything after it, and keeps what it had indexed."""
    registry = bare_registry(staging_certs())
    store = await connect(database, registry)

    async def run(start_index: int) -> PollResult:
        cfg = dataclasses.replace(log_config(fake_server, kind), start_index=start_index)
        indexer = CTIndexer([cfg], registry, store.pool, POLICY, retry=FAST)
        try:
            [result] = await indexer.run_once()
        finally:
            await indexer.aclose()
        return result

    try:
        fixture_log.publish(200)
        assert (await run(0)).next_index == 200
        fixture_log.publish()
        beyond = await run(5000)  # a typo: refused, the position stays
        assert beyond.error is not None and "StartIndexError" in beyond.error
        [pos] = await fetch(database, "SELECT next_index, last_error FROM ct_logs")
        assert pos["next_index"] == 200 and "start_index 5000" in pos["last_error"]
        jumped = await run(700)
        assert jumped.error is None and jumped.next_index == 1024
        assert jumped.scanned == 324 and jumped.indexed == 324
        leaves = sorted(r["leaf_index"] for r in await index_rows(database))
        assert leaves == [*range(200), *range(700, 1024)]
        again = await run(700)  # at or past start_index: no second jump
        assert again.error is None and again.scanned == 0 and again.next_index == 1024
        [pos] = await fetch(database, "SELECT next_index, last_error FROM ct_logs")
        assert pos["next_index"] == 1024 and pos["last_error"] is None
    finally:
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limits_errors_and_bad_signatures_do_not_advance(
    fake_server: FakeLogServer, fixture_log: FakeLog, database: str, kind: str
) -> None:
    registry = bare_registry(staging_certs())
    store = await connect(database, registry)
    try:
        indexer = CTIndexer(
            [log_config(fake_server, kind)], registry, store.pool, POLICY, retry=FAST
        )
        fixture_log.publish(512)
        [r] = await indexer.run_once()
        assert r.error is None and r.next_index == 512
        fixture_log.publish()
        # one HTTP client (its CA bundle load is ~90 ms of CPU, off the event loop) for
        # the life of the indexer: a follower rebuilt after each error below reuses it
        http = indexer.http
        assert http is not None

        async def position() -> tuple[int, int, str | None]:
            [p] = await fetch(database, "SELECT next_index, tree_size, last_error FROM ct_logs")
            return p["next_index"], p["tree_size"], p["last_error"]

        fixture_log.faults.failures = {"/": [429, 503, 429, 503, 503, 429]}
        [r] = await indexer.run_once()
        assert r.error is not None and "RetriesExhausted" in r.error
        n, size, err = await position()
        assert (n, size) == (512, 512) and err and "RetriesExhausted" in err
        fixture_log.faults.failures = {}
        fixture_log.faults.bad_signature = True
        [r] = await indexer.run_once()
        assert r.error is not None and "SignatureError" in r.error
        n, size, err = await position()
        assert (n, size) == (512, 512) and err and "SignatureError" in err
        assert len(await index_rows(database)) == 512
        fixture_log.faults.bad_signature = False
        [r] = await indexer.run_once()
        assert r.error is None
        assert await position() == (1024, 1024, None)
        assert len(await index_rows(database)) == 1024
        follower = indexer.logs[0].follower
        assert indexer.http is http and follower is not None and follower.client.http is http
        await indexer.aclose()
        assert http.is_closed
    finally:
        await store.close()


@pytest.fixture
def caplog_errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.ERROR, logger="responder.ct_indexer")
    yield caplog


@pytest.mark.parametrize("kind", KINDS)
async def test_follower_repairs_lost_writes_within_the_poll(
    fake_server: FakeLogServer,
    fake_log: FakeLog,
    database: str,
    ct_ca: DemoCA,
    ct_issuer: IssuerFiles,
    caplog_errors: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    """Serials the CA recorded are not gaps; serials only in CT (the CA's write was lost)
    are signed good, or revoked when a revocation is recorded, stored, counted and logged."""
    registry = signing_registry({"ctca": ct_ca})
    issuer = registry.issuers[0]
    store = await connect(database, registry)
    other = create_ca("p256", "Someone Else")
    pcsa = precert_signing_ca(ct_ca)
    log = fake_log
    recorded: list[int] = []
    lost: list[int] = []
    for s in range(1, 41):
        ts = now_ms()
        serial = 0x7000 + s
        if s % 4 == 0:
            log.add_x509(ct_ca.issue_leaf("x.test", serial=serial).public_bytes(DER), [], ts)
        elif s % 4 == 1:
            pre, tbs = precert_and_tbs(ct_ca, "p.test", serial)
            log.add_precert(issuer.spki_sha256, tbs, pre, [], ts)
        elif s % 4 == 2:  # from the precertificate signing CA: the log names the real CA
            pre, tbs = precert_and_tbs(ct_ca, "ps.test", serial, pcsa)
            log.add_precert(issuer.spki_sha256, tbs, pre, [pcsa.der], ts)
        else:
            log.add_x509(other.issue_leaf("o.test", serial=serial).public_bytes(DER), [], ts)
            continue
        if s % 3 == 0:
            recorded.append(serial)
        else:
            lost.append(serial)
    log.publish()
    try:
        for serial in recorded:  # the CA's write that did happen
            signed = sign_response(issuer, serial, CertStatus.GOOD, POLICY)
            record = CertificateRecord(
                issuer.db_id, serial, ct_ca.ca_cert.not_valid_after_utc, True
            )
            await store.record_certificates([(record, signed)])
        # One lost serial was revoked, but its response row was lost too.
        revoked_serial = lost[0]
        revocation = Revocation(
            ct_ca.ca_cert.not_valid_before_utc.replace(microsecond=0),
            x509.ReasonFlags.key_compromise,
        )
        signed = sign_response(
            issuer, revoked_serial, CertStatus.REVOKED, POLICY, revocation=revocation
        )
        await store.record_revocation(issuer.db_id, revoked_serial, revocation, signed)
        await store.pool.execute(
            "DELETE FROM responses WHERE serial = $1", signed_key(revoked_serial)
        )
        before = gap_metric("ctca")
        indexer = CTIndexer([log_config(fake_server, kind, batch=16)], registry, store.pool, POLICY)
        [r] = await indexer.run_once()
        await indexer.aclose()
        assert r.error is None and r.indexed == len(recorded) + len(lost)
        assert r.gaps == len(lost) and r.repaired == len(lost)
        assert gap_metric("ctca") - before == len(lost)
        assert r.lag_seconds is not None and 0 <= r.lag_seconds < 60
        gaps = await fetch(database, "SELECT serial, leaf_index, repaired_at FROM coverage_gaps")
        assert sorted(serial_from_key(g["serial"]) for g in gaps) == sorted(lost)
        assert all(g["repaired_at"] is not None for g in gaps)
        for serial in lost:
            [row] = await fetch(
                database, "SELECT der FROM responses WHERE serial = $1", signed_key(serial)
            )
            expect = "revoked" if serial == revoked_serial else "good"
            check_response(bytes(row["der"]), issuer=ct_issuer, serial=serial, expect=expect)
        messages = [rec.getMessage() for rec in caplog_errors.records]
        for serial, gap in ((serial_from_key(g["serial"]), g) for g in gaps):
            assert any(
                f"serial {serial:x} " in m and "log fake" in m and f"leaf {gap['leaf_index']}" in m
                for m in messages
            ), serial
        [lag] = await fetch(database, "SELECT lag_seconds FROM ct_logs")
        assert lag["lag_seconds"] is not None and lag["lag_seconds"] < 60
        assert await CTIndexStore(store.pool).unrepaired_gaps([issuer.db_id]) == []
    finally:
        await store.close()


def signed_key(serial: int) -> bytes:
    return serial_key(serial)


async def test_retired_serials_are_not_gaps_and_null_not_after_is_filled(
    fake_server: FakeLogServer, fake_log: FakeLog, database: str, ct_ca: DemoCA
) -> None:
    """With ``expired_retention``, a CT-only serial whose logged notAfter is further in the
    past is indexed (known, with its notAfter) but is not a coverage gap: nothing is
    signed for it, and an older gap of such a serial is no longer repaired. A serial
    indexed earlier without a notAfter takes the first sighting that has one; one that has
    a notAfter keeps it."""
    registry = signing_registry({"ctca": ct_ca})
    issuer = registry.issuers[0]
    store = await connect(database, registry)
    retention = dt.timedelta(days=7)
    lifetimes = {
        0x9001: dt.timedelta(days=-30),  # expired beyond the retention: retired
        0x9002: dt.timedelta(days=-2),  # expired, within the retention: a gap
        0x9003: dt.timedelta(days=90),  # valid: a gap
        0x9004: dt.timedelta(days=90),  # indexed earlier without a notAfter
        0x9005: dt.timedelta(days=90),  # indexed earlier with another notAfter
    }
    leaves = {
        s: ct_ca.issue_leaf("r.test", serial=s, lifetime=life) for s, life in lifetimes.items()
    }
    for leaf in leaves.values():
        fake_log.add_x509(leaf.public_bytes(DER), [], now_ms())
    fake_log.publish()
    earlier = dt.datetime(2031, 1, 2, tzinfo=dt.UTC)
    try:
        other_log = await store.pool.fetchval(
            "INSERT INTO ct_logs (log_id, name, url) VALUES ($1, 'other', 'http://other') "
            "RETURNING id",
            b"\x01" * 32,
        )
        for serial, not_after in ((0x9004, None), (0x9005, earlier)):
            await store.pool.execute(
                "INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, "
                "                      logged_at, not_after) "
                "SELECT $1, $2, $4, 0, 0, now(), $3",
                issuer.db_id,
                serial_key(serial),
                not_after,
                other_log,
            )
        # an open gap, recorded before, of a serial that has since been retired
        await store.pool.execute(
            "INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, logged_at, "
            "                      not_after) VALUES ($1, $2, $4, 0, 0, now(), $3)",
            issuer.db_id,
            serial_key(0x9100),
            dt.datetime.now(dt.UTC) - dt.timedelta(days=60),
            other_log,
        )
        await store.pool.execute(
            "INSERT INTO coverage_gaps (issuer_id, serial, detected_by) VALUES ($1, $2, 'test')",
            issuer.db_id,
            serial_key(0x9100),
        )
        ct_store = CTIndexStore(store.pool, expired_retention=retention)
        assert [g.serial for g in await CTIndexStore(store.pool).unrepaired_gaps([1])] == [0x9100]
        assert await ct_store.unrepaired_gaps([issuer.db_id]) == []

        indexer = CTIndexer(
            [log_config(fake_server, "static")],
            registry,
            store.pool,
            POLICY,
            expired_retention=retention,
        )
        [r] = await indexer.run_once()
        await indexer.aclose()
        assert r.error is None and r.indexed == 3
        assert (r.gaps, r.repaired) == (2, 2)
        gaps = await fetch(database, "SELECT serial, repaired_at FROM coverage_gaps")
        by_serial = {serial_from_key(g["serial"]): g["repaired_at"] for g in gaps}
        assert set(by_serial) == {0x9002, 0x9003, 0x9100}
        assert by_serial[0x9100] is None  # still open: never covered, never signed
        responses = await fetch(database, "SELECT serial FROM responses")
        assert {serial_from_key(x["serial"]) for x in responses} == {0x9002, 0x9003}
        rows = await fetch(database, "SELECT serial, not_after FROM ct_index")
        not_after = {serial_from_key(x["serial"]): x["not_after"] for x in rows}
        for serial in (0x9001, 0x9002, 0x9003, 0x9004):
            assert not_after[serial] == leaves[serial].not_valid_after_utc, hex(serial)
        assert not_after[0x9005] == earlier
    finally:
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_absurd_timestamps_and_unsignable_gaps_do_not_stop_the_follower(
    fake_server: FakeLogServer, fake_log: FakeLog, database: str, ct_ca: DemoCA, kind: str
) -> None:
    """A log-signed timestamp beyond what the database holds (2^62 ms, 2^64-1 ms) made the
    batch fail on every poll, so the log was never advanced again; and 256 gaps that
    cannot be signed (first in line) starved the repair of every gap behind them."""
    registry = signing_registry({"ctca": ct_ca})
    issuer = registry.issuers[0]
    store = await connect(database, registry)
    serials = [0x6100 + i for i in range(6)]
    stamps = [now_ms(), 2**62, now_ms(), 2**64 - 1, now_ms(), now_ms()]
    for serial, ts in zip(serials, stamps, strict=True):
        fake_log.add_x509(ct_ca.issue_leaf("t.test", serial=serial).public_bytes(DER), [], ts)
    fake_log.publish()
    try:
        # 300 older open gaps that no key can sign (negative serials: cryptography refuses)
        for n in range(300):
            await store.pool.execute(
                "INSERT INTO coverage_gaps (issuer_id, serial, detected_by, detected_at) "
                "VALUES ($1, $2, 'test', now() - interval '1 day')",
                issuer.db_id,
                serial_key(-(n + 1)),
            )
        indexer = CTIndexer([log_config(fake_server, kind)], registry, store.pool, POLICY)
        [r] = await indexer.run_once()
        await indexer.aclose()
        assert r.error is None and r.indexed == 6, r
        [position] = await fetch(database, "SELECT next_index FROM ct_logs")
        assert position["next_index"] == 6
        rows = await fetch(database, "SELECT serial FROM ct_index")
        assert sorted(serial_from_key(x["serial"]) for x in rows) == serials
        responses = await fetch(database, "SELECT serial FROM responses")
        assert sorted(serial_from_key(x["serial"]) for x in responses) == serials
        assert r.repaired == 6
    finally:
        await store.close()


async def test_a_hostile_log_is_an_error_of_its_own_and_the_next_log_is_polled(
    fake_server: FakeLogServer,
    fixture_log: FakeLog,
    database: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unsigned checkpoint with a 2^64 size line raised struct.error out of run_once:
    no result for any log, the healthy log behind it never polled, last_error NULL.
    Any unexpected exception is now the log's stored error, its traceback logged once."""
    registry = bare_registry(staging_certs())
    store = await connect(database, registry)
    try:
        with FakeLogServer(FakeLog("hostile.example/log")) as bad:
            bad.log.publish(0)
            bad.log.faults.head_size = str(2**64)
            indexer = CTIndexer(
                [log_config(bad, "static", name="hostile"), log_config(fake_server, "static")],
                registry,
                store.pool,
                POLICY,
                retry=FAST,
            )
            hostile, healthy = await indexer.run_once()
            assert hostile.error and "MalformedResponseError" in hostile.error
            assert "tree size" in hostile.error
            assert healthy.error is None and healthy.next_index == 1024
            errors = {
                r["name"]: r["last_error"]
                for r in await fetch(database, "SELECT name, last_error FROM ct_logs")
            }
            assert errors["fake"] is None and "tree size" in (errors["hostile"] or "")

            # A bug met while polling one log (here: a RuntimeError) is that log's error.
            real = LogFollower.fetch_head

            async def buggy(self: LogFollower) -> object:
                if self.config.url == bad.url:
                    raise RuntimeError("bug\nin two lines")
                return await real(self)

            monkeypatch.setattr(LogFollower, "fetch_head", buggy)
            caplog.set_level(logging.ERROR, logger="responder.ct_indexer")
            caplog.clear()
            for _ in range(3):
                hostile, healthy = await indexer.run_once()
                assert hostile.error == "RuntimeError: bug in two lines"
                assert healthy.error is None
            [stored] = await fetch(
                database, "SELECT last_error FROM ct_logs WHERE name = 'hostile'"
            )
            assert stored["last_error"] == "RuntimeError: bug in two lines"
            tracebacks = [r for r in caplog.records if r.exc_info]
            lines = [r for r in caplog.records if "RuntimeError: bug in two lines" in r.message]
            assert len(tracebacks) == 1 and len(lines) == 2  # traceback once, then one line
            await indexer.aclose()
    finally:
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_status_is_current_after_errors_and_ct_status_exits_non_zero(
    fake_server: FakeLogServer, fixture_log: FakeLog, database: str, kind: str
) -> None:
    """A 503 storm's error stayed in last_error after a poll that succeeded on a log that
    had not grown (only a committed batch cleared it); a log stuck on a bad entry showed
    its old tree size (0 behind); ct-status exited 0 whatever it showed."""
    registry = bare_registry(staging_certs())
    store = await connect(database, registry)

    async def position() -> tuple[int, int, str | None]:
        [p] = await fetch(database, "SELECT next_index, tree_size, last_error FROM ct_logs")
        return p["next_index"], p["tree_size"], p["last_error"]

    async def status() -> int:
        # the indexer here retires nothing (no expired_retention): neither does this
        config = SimpleNamespace(ct_logs=[], expired_retention=dt.timedelta(days=36500))
        return exit_status(await collect(config, database))  # type: ignore[arg-type]

    try:
        indexer = CTIndexer(
            [log_config(fake_server, kind, batch=200)], registry, store.pool, POLICY, retry=FAST
        )
        fixture_log.publish(512)
        [r] = await indexer.run_once()
        assert r.error is None and await position() == (512, 512, None)
        assert await status() == EXIT_OPEN_GAPS  # staging issuers: we cannot sign, gaps open
        fixture_log.faults.failures = {"/": [503] * 10}
        [r] = await indexer.run_once()
        assert r.error and "RetriesExhausted" in r.error
        assert (r.next_index, r.tree_size) == (512, 512)
        assert await status() == EXIT_LOG_ERROR
        fixture_log.faults.failures = {}
        [r] = await indexer.run_once()  # no growth: no batch to commit
        assert r.error is None and await position() == (512, 512, None)
        assert await status() == EXIT_OPEN_GAPS
        # A bad entry stops the log below its verified head: the head's size is shown.
        fixture_log.publish()
        fixture_log.faults.tamper = {700}
        [r] = await indexer.run_once()
        assert r.error is not None and r.tree_size == 1024
        n, size, err = await position()
        assert n < 1024 and size == 1024 and err
        assert await status() == EXIT_LOG_ERROR
        await indexer.aclose()
    finally:
        await store.close()


async def test_a_dripping_log_fails_with_its_error_stored_and_the_next_log_is_polled(
    fake_server: FakeLogServer, fixture_log: FakeLog, database: str
) -> None:
    """A checkpoint dripped a byte at a time (each within the read timeout) held run_once
    forever: the healthy log behind it was never polled and no error was stored."""
    registry = bare_registry(staging_certs())
    store = await connect(database, registry)
    retry = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05, timeout=1, total_timeout=1)
    try:
        with FakeLogServer(FakeLog("drip.example/log")) as slow:
            slow.log.publish(0)
            slow.log.faults.drip = 0.05
            indexer = CTIndexer(
                [log_config(slow, "static", name="drip"), log_config(fake_server, "static")],
                registry,
                store.pool,
                POLICY,
                retry=retry,
            )
            try:
                drip, healthy = await asyncio.wait_for(indexer.run_once(), 20)
            finally:
                slow.log.faults.drip = None
            assert drip.error and "RetriesExhausted" in drip.error and "within 1s" in drip.error
            assert healthy.error is None and healthy.next_index == 1024
            [row] = await fetch(database, "SELECT last_error FROM ct_logs WHERE name = 'drip'")
            assert "within 1s" in row["last_error"]
            await indexer.aclose()
    finally:
        await store.close()


def suspicious_metric(log_name: str) -> float:
    value = REGISTRY.get_sample_value("ct_suspicious_entries_total", {"log": log_name})
    return value or 0.0


@pytest.mark.parametrize("kind", KINDS)
async def test_precert_naming_our_key_hash_is_indexed_only_if_our_key_signed_it(
    fake_server: FakeLogServer,
    fake_log: FakeLog,
    database: str,
    ct_ca: DemoCA,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    """A hostile log (or submitter) can write our issuer_key_hash on any precert: an entry
    is ours only if our key signed its precertificate, directly or through a
    Precertificate Signing Certificate (CT EKU) that our key signed. Forged entries get
    no index row, no gap, no 'good' response; they are counted and logged once per
    batch. The genuine ones are indexed and signed; a genuine precertificate logged with
    another TBSCertificate is indexed by its own serial and notAfter (what our key
    vouched for), never the log's, and reported."""
    registry = signing_registry({"ctca": ct_ca})
    issuer = registry.issuers[0]
    store = await connect(database, registry)
    evil = create_ca("p256", "Evil Foreign CA")
    evil_psc = precert_signing_ca(evil)  # a signing CA, but not under our key
    no_eku = make_ca("Not A Precert Signer", CA(ct_ca.ca_cert, ct_ca.ca_key))  # type: ignore[arg-type]
    pcsa = precert_signing_ca(ct_ca)
    ikh, ts, log = issuer.spki_sha256, now_ms(), fake_log

    def add(
        ca: DemoCA,
        serial: int,
        chain: list[bytes],
        signer: CA | None = None,
        *,
        logged_serial: int | None = None,
        logged_lifetime: dt.timedelta | None = None,
    ) -> None:
        pre, tbs = precert_and_tbs(
            ca,
            "v.test",
            serial,
            signer,
            logged_serial=logged_serial,
            logged_lifetime=logged_lifetime,
        )
        log.add_precert(ikh, tbs, pre, chain, ts)

    add(evil, 0x4242, [])  # the audit's probe: foreign CA, our key hash
    add(evil, 0x4243, [evil_psc.der], evil_psc)  # signing CA chained to the foreign CA
    add(ct_ca, 0x4244, [no_eku.der], no_eku)  # under our key, but no CT precert EKU
    add(ct_ca, 0x4245, [], logged_serial=0x4246)  # ours, but the logged TBS names another
    add(ct_ca, 0x4247, [], logged_lifetime=dt.timedelta(days=30))  # another notAfter
    add(ct_ca, 0x5001, [])  # genuine, direct
    add(ct_ca, 0x5002, [pcsa.der], pcsa)  # genuine, via our precertificate signing CA
    log.publish()
    before = suspicious_metric("fake")
    try:
        with caplog.at_level(logging.WARNING, logger="responder.ct_indexer"):
            indexer = CTIndexer([log_config(fake_server, kind)], registry, store.pool, POLICY)
            [r] = await indexer.run_once()
            await indexer.aclose()
        assert r.error is None and r.malformed == 0
        ours = [0x4245, 0x4247, 0x5001, 0x5002]
        indexed = await fetch(database, "SELECT serial, not_after FROM ct_index")
        assert sorted(serial_from_key(x["serial"]) for x in indexed) == ours
        [mismatched] = [x for x in indexed if serial_from_key(x["serial"]) == 0x4247]
        life = mismatched["not_after"] - dt.datetime.now(dt.UTC)  # the precert's 90 days
        assert dt.timedelta(days=89) < life <= dt.timedelta(days=90)
        gaps = await fetch(database, "SELECT serial FROM coverage_gaps")
        assert sorted(serial_from_key(g["serial"]) for g in gaps) == ours
        answered = await fetch(database, "SELECT serial FROM responses")
        assert sorted(serial_from_key(a["serial"]) for a in answered) == ours
        assert r.suspicious == 5 and suspicious_metric("fake") - before == 5
        [line] = [m for m in caplog.messages if "did not sign" in m]
        assert "CT log fake: 3 entries" in line and "leaf 0" in line
        [line] = [m for m in caplog.messages if "differs from them" in m]
        assert "2 precertificates" in line and "leaf 3, serial 4245" in line
    finally:
        await store.close()
