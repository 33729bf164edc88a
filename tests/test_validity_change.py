"""Responses signed under a longer ``response_validity`` than the one configured now.

An operator lowers the validity (7 days renewed 3 days before nextUpdate, to the default
4 days and 2): the stored 7-day responses must still be renewed no later than 4 days after
their thisUpdate (BR 4.9.9), although ``nextUpdate - refresh_margin`` is 5 days after it.
Real rows signed "in the past" (tests/stored_rows.py), a real `serve` and `refresh`.
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
from cryptography.x509 import ocsp

from responder.config import Config
from responder.refresh_store import MAX_CERTIFICATE_LIFETIME, RefreshStore, Window, overdue_query
from responder.schema import ct_index_has_not_after, responses_has_this_update_index
from signer.demo_ca import random_serial
from signer.response_builder import ValidityPolicy
from tests.stored_rows import issuer_with_responder, load_issuer, put_row, sign_at, stored
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    run_cli,
    write_config,
)

#: the configuration before the change
SEVEN_DAYS = ValidityPolicy(validity=dt.timedelta(days=7), refresh_margin=dt.timedelta(days=3))
BR_MAX_AGE = dt.timedelta(days=4)


@pytest.fixture(scope="module")
def lowered(workdir: Path) -> IssuerFiles:
    return issuer_with_responder(
        "lowered", workdir, valid_from=dt.timedelta(days=30), valid_for=dt.timedelta(days=365)
    )


def old_row(proc: ResponderProcess, issuer_files: IssuerFiles, dsn: str, signed_ago: dt.timedelta):  # type: ignore[no-untyped-def]
    """A recorded certificate whose stored response was signed ``signed_ago`` under the
    7-day policy; returns (certificate, stored response)."""
    cert = issuer_files.ca.issue_leaf("lowered.test", serial=random_serial() & ~0xFF)
    assert proc.record(cert).status_code == 201
    issuer = load_issuer(proc.config_path, issuer_files.name, dsn)
    moment = dt.datetime.now(dt.UTC).replace(microsecond=0) - signed_ago
    signed = sign_at(issuer, cert.serial_number, moment, policy=SEVEN_DAYS)
    put_row(dsn, issuer, cert.serial_number, signed)
    return cert, signed


@pytest.fixture(scope="module")
def serving(
    module_database: str, lowered: IssuerFiles, workdir: Path
) -> Iterator[ResponderProcess]:
    proc = write_config(
        workdir / "lowered", module_database, [lowered], extra="refresher = false\n"
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_seven_day_response_is_not_served_past_four_days(serving, lowered, module_database):  # type: ignore[no-untyped-def]
    # thisUpdate 4 d 1 h 30 min ago, nextUpdate in 2 d 22 h 30 min: still "2 days to go"
    # by the new margin, but past BR's 4 days
    cert, old = old_row(serving, lowered, module_database, dt.timedelta(days=4, minutes=30))
    now = dt.datetime.now(dt.UTC)
    assert now.timestamp() - old.this_update > BR_MAX_AGE.total_seconds()
    answer = httpx.get(get_url(serving.url, build_request(cert, lowered.ca.ca_cert)))
    assert answer.content != old.der
    checked = check_response(answer.content, issuer=lowered, serial=cert.serial_number)
    assert checked.response.this_update_utc > now - dt.timedelta(hours=2)
    # and what was signed instead is stored, for every other instance
    issuer = load_issuer(serving.config_path, lowered.name, module_database)
    assert stored(module_database, issuer, cert.serial_number)["der"] == answer.content


def test_max_age_stops_at_the_renewal_point(serving, lowered, module_database):  # type: ignore[no-untyped-def]
    # its BR deadline (thisUpdate + 4 d) is 10 minutes away: no cache may keep it longer
    cert, old = old_row(
        serving, lowered, module_database, dt.timedelta(days=4) - dt.timedelta(minutes=70)
    )
    url = get_url(serving.url, build_request(cert, lowered.ca.ca_cert))
    # the server reckons max-age from its clock's whole second, read between these two:
    # a clock read only after the answer is a second boundary later now and then
    asked_at = int(time.time())
    answer = httpx.get(url)
    answered_by = int(time.time())
    assert answer.content == old.der  # still before its renewal point: served as stored
    max_age = int(answer.headers["cache-control"].split(",")[0].removeprefix("max-age="))
    deadline = old.this_update + int(BR_MAX_AGE.total_seconds())
    assert deadline - answered_by <= max_age <= deadline - asked_at
    parsed = ocsp.load_der_ocsp_response(answer.content)
    assert parsed.next_update_utc is not None
    assert answer.headers["expires"] == parsed.next_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")


def test_refresher_renews_by_the_br_deadline(serving, lowered, module_database, workdir):  # type: ignore[no-untyped-def]
    # nextUpdate in 2 d + 59 s (just within the refresher's reach with a 60 s spread),
    # thisUpdate 5 days ago: overdue by BR for a day, not yet due by nextUpdate - margin
    cert, old = old_row(
        serving, lowered, module_database, dt.timedelta(days=5) - dt.timedelta(hours=1, seconds=59)
    )
    config = write_config(
        workdir / "lowered-refresh", module_database, [lowered], extra='refresher_spread = "60s"\n'
    ).config_path
    result = run_cli(config, "refresh")
    assert result.returncode == 0, result.stderr
    issuer = load_issuer(config, lowered.name, module_database)
    row = stored(module_database, issuer, cert.serial_number)
    assert row["der"] != old.der
    assert row["this_update"] > dt.datetime.now(dt.UTC).timestamp() - 2 * 3600


def test_refresher_finds_a_row_its_next_update_range_does_not_reach(  # type: ignore[no-untyped-def]
    serving, lowered, module_database, workdir
):
    """thisUpdate 4 days 6.5 h ago under the 7-day policy: past its BR deadline, while
    nextUpdate - refresh_margin (2 days) is still ~17 h away, beyond the refresher's
    nextUpdate range (2 days + spread). It was left there until a client asked for it;
    with migration 0007's index on thisUpdate the refresher finds it, and the
    past-deadline metric and readiness's overdue count count it before."""
    before, overdue_before = past_deadline(module_database), overdue(module_database)
    # 4 days + 6 h 30 min: past the BR deadline by more than readiness's default 6 h slack
    cert, old = old_row(
        serving, lowered, module_database, dt.timedelta(days=4, hours=6, minutes=30)
    )
    assert past_deadline(module_database) == before + 1
    assert overdue(module_database) == overdue_before + 1
    proc = write_config(
        workdir / "lowered-far", module_database, [lowered], extra='refresher_spread = "60s"\n'
    )
    result = run_cli(proc.config_path, "refresh")
    assert result.returncode == 0, result.stderr
    issuer = load_issuer(proc.config_path, lowered.name, module_database)
    row = stored(module_database, issuer, cert.serial_number)
    assert row["der"] != old.der
    assert row["this_update"] > dt.datetime.now(dt.UTC).timestamp() - 2 * 3600
    assert past_deadline(module_database) == 0 and overdue(module_database) == 0


def overdue(dsn: str) -> int:
    """Readiness's count of responses overdue for refresh (responder/health.py), with the
    default policy and slack, on the schema as migrated."""

    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            now = dt.datetime.now(dt.UTC)
            policy, slack = ValidityPolicy(), Config().refresh_deadline_slack
            flags = await ct_index_has_not_after(conn), await responses_has_this_update_index(conn)
            return int(
                await conn.fetchval(
                    overdue_query(*flags),
                    now + policy.refresh_margin - slack,
                    now,
                    dt.timedelta(0),
                    MAX_CERTIFICATE_LIFETIME,
                    policy.refresh_margin,
                    policy.validity,
                    slack,
                )
            )
        finally:
            await conn.close()

    return asyncio.run(count())


def past_deadline(dsn: str) -> int:
    """ocsp_responses_past_refresh_deadline as the refresher's sampler counts it now."""

    async def count() -> int:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            window = Window(
                dt.datetime.now(dt.UTC), ValidityPolicy(), dt.timedelta(0), dt.timedelta(days=7)
            )
            return (await RefreshStore(pool).freshness(window, {}, 10)).past_deadline
        finally:
            await pool.close()

    return asyncio.run(count())


def test_warm_up_does_not_cache_it_either(serving, lowered, module_database, workdir):  # type: ignore[no-untyped-def]
    cert, old = old_row(serving, lowered, module_database, dt.timedelta(days=4, minutes=30))
    fresh = write_config(
        workdir / "lowered-warm", module_database, [lowered], extra="refresher = false\n"
    ).start()
    try:
        deadline = time.monotonic() + 10
        while "warm-up:" not in fresh.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "warm-up:" in fresh.log()
        answer = httpx.get(get_url(fresh.url, build_request(cert, lowered.ca.ca_cert)))
        assert answer.content != old.der
        check_response(answer.content, issuer=lowered, serial=cert.serial_number)
    finally:
        fresh.stop()
