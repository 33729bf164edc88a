"""The refresher keeps every stored response inside BR 4.9.9.

Rows are really signed "in the past" (tests/stored_rows.py) so that they are due; the
refresher then runs for real against PostgreSQL: two refreshers at once (as two `serve`
instances would) re-sign each due row exactly once, revoked rows stay revoked, certificates
expired beyond the retention leave the cycle, the jitter spreads due times, the CLI runs
one pass, and `serve` runs it in the background and exports the freshness metrics.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from cryptography import x509

from responder.protocol import UNAUTHORIZED
from responder.refresh_store import RefreshStore
from responder.store import serial_key
from signer.demo_ca import random_serial
from signer.issuers import IssuerRegistry
from signer.refresher import PassReport, Refresher, RefresherSettings
from signer.response_builder import (
    Revocation,
    ValidityPolicy,
    br_refresh_deadline,
    renewal_point,
)
from tests.stored_rows import (
    issuer_with_responder,
    load_issuer,
    put_row,
    sign_at,
    stored,
)
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    run_cli,
    sql_sync,
    write_config,
)

HOUR = 3600
DAY = 24 * HOUR


def test_renewal_point_follows_br_4_9_9() -> None:
    policy = ValidityPolicy()  # 4 d validity, renew 2 d before nextUpdate
    assert renewal_point(0, 4 * DAY, policy) == 2 * DAY
    # capped by an expiring signer: renew at the response's own BR deadline, never
    # "nextUpdate - 2 d" (before its thisUpdate: due forever)
    assert renewal_point(0, 10 * HOUR, policy) == 5 * HOUR  # < 16 h: half the validity
    assert renewal_point(0, 30 * HOUR, policy) == 22 * HOUR  # >= 16 h: 8 h before nextUpdate
    assert br_refresh_deadline(0, 10 * DAY) == 4 * DAY  # no later than 4 d after thisUpdate
    for validity in (8 * HOUR, 15 * HOUR, 16 * HOUR, 3 * DAY, 4 * DAY):
        assert renewal_point(0, validity, policy) <= br_refresh_deadline(0, validity)


@pytest.fixture(scope="module")
def seasoned_issuer(workdir: Path) -> IssuerFiles:
    return issuer_with_responder(
        "seasoned", workdir, valid_from=dt.timedelta(days=30), valid_for=dt.timedelta(days=365)
    )


@pytest.fixture
def recorder(
    database: str, seasoned_issuer: IssuerFiles, tmp_path: Path
) -> Iterator[ResponderProcess]:
    """A responder on a fresh database, its own refresher off: the test runs refreshers."""
    proc = write_config(tmp_path, database, [seasoned_issuer], extra="refresher = false\n").start()
    try:
        yield proc
    finally:
        proc.stop()


def registry_for(proc: ResponderProcess, dsn: str, name: str) -> IssuerRegistry:
    return IssuerRegistry([load_issuer(proc.config_path, name, dsn)])


async def run_refreshers(
    dsn: str, registry: IssuerRegistry, count: int, settings: RefresherSettings
) -> list[PassReport]:
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=4) for _ in range(count)]
    try:
        refreshers = [
            Refresher(registry, RefreshStore(pool), ValidityPolicy(), settings) for pool in pools
        ]
        return list(await asyncio.gather(*(r.run_pass() for r in refreshers)))
    finally:
        for pool in pools:
            await pool.close()


async def sample(dsn: str, registry: IssuerRegistry) -> tuple[int, int]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        refresher = Refresher(registry, RefreshStore(pool), ValidityPolicy(), RefresherSettings())
        fresh = await refresher.sample()
        assert set(fresh.age_quantiles) == {"0.5", "0.9", "0.99", "1"}
        return fresh.backlog, fresh.past_deadline
    finally:
        await pool.close()


def record(proc: ResponderProcess, issuer: IssuerFiles, n: int) -> list[x509.Certificate]:
    certs = [issuer.ca.issue_leaf(f"r{i}.refresh.test") for i in range(n)]
    for cert in certs:
        assert proc.record(cert).status_code == 201
    return certs


def test_two_refreshers_resign_each_due_row_once(recorder, seasoned_issuer, database):  # type: ignore[no-untyped-def]
    certs = record(recorder, seasoned_issuer, 12)
    registry = registry_for(recorder, database, seasoned_issuer.name)
    issuer = registry.issuers[0]
    now = dt.datetime.now(dt.UTC)
    due, fresh = certs[:8], certs[8:]
    for cert in due:
        put_row(
            database,
            issuer,
            cert.serial_number,
            sign_at(issuer, cert.serial_number, now - dt.timedelta(days=3)),
        )
    # one long past its BR deadline (and its nextUpdate): a refresher that was down
    late = due[1]
    put_row(
        database,
        issuer,
        late.serial_number,
        sign_at(issuer, late.serial_number, now - dt.timedelta(days=4, hours=2)),
    )
    # one revoked, with an old revoked response: must come back revoked
    revoked = due[2]
    revocation = Revocation(now - dt.timedelta(days=3, hours=2), x509.ReasonFlags.key_compromise)
    sql_sync(
        database,
        "INSERT INTO revocations (issuer_id, serial, revoked_at, reason) VALUES ($1, $2, $3, 1)",
        issuer.db_id,
        serial_key(revoked.serial_number),
        revocation.revoked_at,
    )
    put_row(
        database,
        issuer,
        revoked.serial_number,
        sign_at(issuer, revoked.serial_number, now - dt.timedelta(days=3), revocation=revocation),
    )
    # one expired 30 days ago: beyond the 7-day retention, out of the cycle
    retired = due[3]
    sql_sync(
        database,
        "UPDATE certificates SET not_after = now() - interval '30 days' WHERE serial = $1",
        serial_key(retired.serial_number),
    )
    before = {c.serial_number: stored(database, issuer, c.serial_number) for c in certs}
    backlog, past_deadline = asyncio.run(sample(database, registry))
    assert backlog == 7 and past_deadline == 1

    settings = RefresherSettings(batch_size=2, concurrency=2)
    reports = asyncio.run(run_refreshers(database, registry, 2, settings))
    assert sum(r.total for r in reports) == 7  # each due row exactly once
    assert all(not r.failures for r in reports)

    for cert in due:
        after = stored(database, issuer, cert.serial_number)
        if cert is retired:
            assert after == before[cert.serial_number]
            continue
        assert after["this_update"] > now.timestamp() - 2 * HOUR
        expect = "revoked" if cert is revoked else "good"
        check_response(
            after["der"], issuer=seasoned_issuer, serial=cert.serial_number, expect=expect
        )  # type: ignore[arg-type]
    for cert in fresh:
        assert stored(database, issuer, cert.serial_number) == before[cert.serial_number]
    assert asyncio.run(sample(database, registry)) == (0, 0)
    # nothing left: another pass does nothing
    assert asyncio.run(run_refreshers(database, registry, 1, settings))[0].total == 0


def test_jitter_spreads_rows_due_at_the_same_moment(recorder, seasoned_issuer, database):  # type: ignore[no-untyped-def]
    """Two rows whose renewal point is 30 min away: with a 1 h spread the row whose serial
    ends in 0xff is claimed (1 h early) and the one ending in 0x00 waits (15 min early)."""
    registry = registry_for(recorder, database, seasoned_issuer.name)
    issuer = registry.issuers[0]
    early, late = (random_serial() & ~0xFF) | 0xFF, random_serial() & ~0xFF
    # thisUpdate = moment - 1 h; renewal point = thisUpdate + 4 d - 2 d = now + 30 min
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(days=2) + dt.timedelta(hours=1, minutes=30)
    for serial in (early, late):
        put_row(database, issuer, serial, sign_at(issuer, serial, moment))
    settings = RefresherSettings(spread=dt.timedelta(hours=1))
    assert asyncio.run(run_refreshers(database, registry, 1, settings))[0].total == 1
    assert stored(database, issuer, early)["this_update"] > moment.timestamp()
    assert stored(database, issuer, late)["this_update"] < moment.timestamp()


def test_retired_certificate_answers(recorder, seasoned_issuer, database):  # type: ignore[no-untyped-def]
    """Past notAfter + retention: the last stored response is served until its nextUpdate
    (a revoked one stays revoked), then `unauthorized`; never signed again."""
    registry = registry_for(recorder, database, seasoned_issuer.name)
    issuer = registry.issuers[0]
    gone, fading, revoked = record(recorder, seasoned_issuer, 3)
    sql_sync(database, "UPDATE certificates SET not_after = now() - interval '30 days'")
    now = dt.datetime.now(dt.UTC)
    expired = sign_at(issuer, gone.serial_number, now - dt.timedelta(days=5))
    put_row(database, issuer, gone.serial_number, expired)
    due = sign_at(issuer, fading.serial_number, now - dt.timedelta(days=3))  # valid, due
    put_row(database, issuer, fading.serial_number, due)
    assert recorder.revoke(seasoned_issuer.name, revoked.serial_number).status_code == 201

    def answer(cert: x509.Certificate) -> bytes:
        url = get_url(recorder.url, build_request(cert, seasoned_issuer.ca.ca_cert))
        return httpx.get(url, timeout=10).content

    assert answer(gone) == UNAUTHORIZED
    assert answer(fading) == due.der  # not re-signed, but still valid: served as is
    check_response(
        answer(revoked), issuer=seasoned_issuer, serial=revoked.serial_number, expect="revoked"
    )
    settings = RefresherSettings()
    assert asyncio.run(run_refreshers(database, registry, 1, settings))[0].total == 0


def test_cli_refresh_runs_one_pass(recorder, seasoned_issuer, database):  # type: ignore[no-untyped-def]
    (cert,) = record(recorder, seasoned_issuer, 1)
    issuer = registry_for(recorder, database, seasoned_issuer.name).issuers[0]
    now = dt.datetime.now(dt.UTC)
    put_row(
        database,
        issuer,
        cert.serial_number,
        sign_at(issuer, cert.serial_number, now - dt.timedelta(days=3)),
    )
    result = run_cli(recorder.config_path, "refresh")
    assert result.returncode == 0, result.stderr
    assert "re-signed 1 (due: 1)" in result.stdout
    assert "past BR deadline: 0" in result.stdout
    assert stored(database, issuer, cert.serial_number)["this_update"] > now.timestamp() - 2 * HOUR


def test_serve_refreshes_in_background_and_exports_freshness(  # type: ignore[no-untyped-def]
    database, seasoned_issuer, tmp_path
):
    proc = write_config(
        tmp_path, database, [seasoned_issuer], extra='refresher_interval = "1s"\n'
    ).start()
    try:
        (cert,) = record(proc, seasoned_issuer, 1)
        issuer = registry_for(proc, database, seasoned_issuer.name).issuers[0]
        now = dt.datetime.now(dt.UTC)
        put_row(
            database,
            issuer,
            cert.serial_number,
            sign_at(issuer, cert.serial_number, now - dt.timedelta(days=4, hours=2)),
        )
        deadline = time.monotonic() + 10
        while (
            stored(database, issuer, cert.serial_number)["this_update"] < now.timestamp() - 2 * HOUR
        ):
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.2)
        time.sleep(1.5)  # one more pass and sample
        text = httpx.get(
            proc.admin_url + "/metrics",
            headers={"Authorization": f"Bearer {proc.token}"},
            timeout=10,
        ).text
        assert "ocsp_responses_past_refresh_deadline 0.0" in text
        assert "ocsp_refresher_backlog 0.0" in text
        assert 'ocsp_stored_response_age_seconds{quantile="1"}' in text
        assert 'ocsp_refresher_resigned_total{issuer="seasoned",reason="due"} 1.0' in text
        # scrapers need no token on the (internal) admin listener: docs/operations.md
        assert httpx.get(proc.admin_url + "/metrics", timeout=10).status_code == 200
    finally:
        proc.stop()


def test_serials_known_only_from_ct_leave_the_cycle_by_their_logged_not_after(  # type: ignore[no-untyped-def]
    recorder, seasoned_issuer, database
):
    """A serial the CA never recorded but CT logged (its write was lost) has the logged
    certificate's notAfter (ct_index.not_after, migration 0005): beyond it + the
    retention its response is no longer re-signed, and with no stored response it is not
    signed on demand (unauthorized). Unknown notAfter (rows indexed before 0005): kept."""
    registry = registry_for(recorder, database, seasoned_issuer.name)
    issuer = registry.issuers[0]
    now = dt.datetime.now(dt.UTC)
    [log_id] = sql_sync(
        database,
        "INSERT INTO ct_logs (log_id, name, url) VALUES ($1, 'test', 'http://log.test') "
        "RETURNING id",
        bytes(32),
    )
    expired, current, unknown, expired_unsigned, current_unsigned = (
        random_serial() for _ in range(5)
    )
    logged = {
        expired: now - dt.timedelta(days=30),  # beyond the 7-day retention
        current: now + dt.timedelta(days=60),
        unknown: None,
        expired_unsigned: now - dt.timedelta(days=30),
        current_unsigned: now + dt.timedelta(days=60),
    }
    for leaf_index, (serial, not_after) in enumerate(logged.items()):
        sql_sync(
            database,
            "INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, logged_at, "
            "                      not_after) VALUES ($1, $2, $3, $4, 1, now(), $5)",
            issuer.db_id,
            serial_key(serial),
            log_id["id"],
            leaf_index,
            not_after,
        )
    for serial in (expired, current, unknown):  # due: signed 3 days ago
        put_row(database, issuer, serial, sign_at(issuer, serial, now - dt.timedelta(days=3)))
    before = {s: stored(database, issuer, s) for s in (expired, current, unknown)}

    [report] = asyncio.run(run_refreshers(database, registry, 1, RefresherSettings()))
    assert report.total == 2 and not report.failures
    assert stored(database, issuer, expired) == before[expired]  # out of the cycle
    for serial in (current, unknown):
        assert stored(database, issuer, serial)["this_update"] > now.timestamp() - 2 * HOUR
    # readiness does not count the retired one as overdue (it would stay not ready for
    # good): the health check reckons notAfter as the refresher does
    from responder.refresh_store import overdue_query
    from responder.store import MAX_CERTIFICATE_LIFETIME

    threshold = now + dt.timedelta(days=2) - dt.timedelta(hours=6)  # margin - slack
    check_now = dt.datetime.now(dt.UTC)
    overdue = {
        flag: sql_sync(
            database,
            overdue_query(flag),
            threshold,
            check_now,
            dt.timedelta(0),
            MAX_CERTIFICATE_LIFETIME,
            dt.timedelta(days=2),
            dt.timedelta(days=4),
            dt.timedelta(hours=6),
        )
        for flag in (True, False)
    }
    assert overdue[True][0]["count"] == 0
    assert overdue[False][0]["count"] == 1  # without the logged notAfter it would count

    def answer(serial: int) -> bytes:
        der = build_request(None, seasoned_issuer.ca.ca_cert, serial=serial)
        return httpx.get(get_url(recorder.url, der), timeout=10).content

    assert answer(expired_unsigned) == UNAUTHORIZED  # retired: never signed on demand
    check_response(answer(current_unsigned), issuer=seasoned_issuer, serial=current_unsigned)
