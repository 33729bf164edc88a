"""The alerts that guard the 15-minute bound fire in the default deployment.

``ct-status``, documented as a monitoring check, exited 0 for a configured log that no
follower had ever polled, or had not polled for hours.

By default the CT follower is its own process (``ocsp-responder ct-follow``, no metrics
endpoint), so the follower's own counters never reached Prometheus: a follower that never
ran, a log failing for an hour or a gap left open showed nothing on ``serve``'s /metrics.
``serve`` now exports them from the database (responder/ct_coverage.py).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import subprocess
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from responder.ct_coverage import open_gaps_query
from responder.store import serial_key
from signer.demo_ca import DemoCA
from tests.support import VENV_BIN, IssuerFiles, ResponderProcess, sql, write_config

from .fakelog import FakeLog, FakeLogServer
from .index_support import ct_log_table, now_ms, precert_and_tbs, spki_sha256, wait_until


def samples(proc: ResponderProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(proc.admin_url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(proc: ResponderProcess, name: str, **labels: str) -> float | None:
    return samples(proc).get((name, tuple(sorted(labels.items()))))


def cli(proc: ResponderProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), *args, "--config", str(proc.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def ct_follow_once(proc: ResponderProcess) -> subprocess.CompletedProcess[str]:
    return cli(proc, "ct-follow", "--once")


async def test_serve_exports_follower_progress_and_open_gaps_from_the_database(
    fake_server: FakeLogServer,
    fake_log: FakeLog,
    database: str,
    ct_ca: DemoCA,
    ct_issuer: IssuerFiles,
    tmp_path: Path,
) -> None:
    key_hash = spki_sha256(ct_ca.ca_cert)
    for serial in (0x7A01, 0x7A02):  # precerts whose recording with us was lost
        pre, tbs = precert_and_tbs(ct_ca, "m.test", serial)
        fake_log.add_precert(key_hash, tbs, pre, [], now_ms())
    fake_log.publish()
    # the default deployment: the follower is not inside serve
    proc = write_config(
        tmp_path,
        database,
        [ct_issuer],
        extra='health_check_interval = "1s"\n' + ct_log_table(fake_server, "static", name="m"),
    ).start()
    try:

        async def shows(name: str, check: object, **labels: str) -> bool:
            value = metric(proc, name, **labels)
            return value is not None and bool(check(value))  # type: ignore[operator]

        # no follower has ever run: the log is "never updated", which an alert sees
        await wait_until(
            lambda: shows("ct_log_seconds_since_update", math.isinf, log="m"),
            what="a never-polled log to show +Inf",
        )
        # ct-status, the documented monitoring check, says so too (it exited 0)
        status = cli(proc, "ct-status")
        assert status.returncode == 1, status.stdout + status.stderr
        assert "m: never polled: is a follower running?" in status.stdout
        done = ct_follow_once(proc)
        assert done.returncode == 0, done.stdout + done.stderr
        assert cli(proc, "ct-status").returncode == 0

        # (a sample taken while ct-follow ran may precede its lag update: wait for all)
        async def followed() -> bool:
            now = samples(proc)
            lag = now.get(("ct_lag_seconds", (("log", "m"),)))
            return (
                now.get(("ct_log_seconds_since_update", (("log", "m"),)), math.inf) < 60
                and now.get(("ct_log_poll_failing", (("log", "m"),))) == 0
                and now.get(("ct_log_behind_entries", (("log", "m"),))) == 0
                and now.get(("coverage_gaps_open", (("issuer", "ctca"),))) == 0
                and lag is not None
                and 0 <= lag < 120
            )

        await wait_until(followed, what="the follower's poll, lag and repaired gaps to show")
        # a follower that stopped: the row goes stale
        await sql(database, "UPDATE ct_logs SET updated_at = now() - interval '1 hour'")
        status = cli(proc, "ct-status")
        assert status.returncode == 1 and "m: not polled for 3" in status.stdout, status.stdout
        await wait_until(
            lambda: shows("ct_log_seconds_since_update", lambda v: v >= 3600, log="m"),
            what="the stale row to show",
        )
        assert ct_follow_once(proc).returncode == 0
        # a gap that cannot be signed (cryptography refuses a negative serial) stays open
        await sql(
            database,
            "INSERT INTO coverage_gaps (issuer_id, serial, detected_by) "
            "SELECT id, $1, 'test' FROM issuers WHERE name = 'ctca'",
            serial_key(-5),
        )
        await wait_until(
            lambda: shows("coverage_gaps_open", lambda v: v == 1, issuer="ctca"),
            what="the open gap to show",
        )
        # the log fails (bad checkpoint signature): the failure shows
        fake_log.faults.bad_signature = True
        failed = ct_follow_once(proc)
        assert failed.returncode == 1
        await wait_until(
            lambda: shows("ct_log_poll_failing", lambda v: v == 1, log="m"),
            what="the failing log to show",
        )
        assert re.search(r"ct-follow", (Path(str(proc.log_path))).read_text())
    finally:
        fake_log.faults.bad_signature = False
        proc.stop()


async def test_ct_status_leaves_retired_gaps_out_of_its_exit_status(
    database: str, tmp_path: Path
) -> None:
    """A gap whose certificate expired beyond expired_retention is retired: answered
    unauthorized on purpose, its row open for good as the record that it was never
    covered. serve's coverage_gaps_open leaves it out; ct-status exited 2 for ever."""
    config = tmp_path / "status.toml"
    config.write_text(f'database_url = "{database}"\nexpired_retention = "7d"\n')

    def ct_status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "ocsp-responder"), "ct-status", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    await sql(
        database,
        "INSERT INTO issuers (spki_sha256, name, subject) VALUES ($1, 'old', 'CN=old')",
        bytes(32),
    )
    retired, live = serial_key(0x51), serial_key(0x52)
    await sql(
        database,
        "INSERT INTO certificates (issuer_id, serial, not_after, kinds) "
        "SELECT id, $1, now() - interval '30 days', 1 FROM issuers",
        retired,
    )
    await sql(
        database,
        "INSERT INTO coverage_gaps (issuer_id, serial, detected_by) "
        "SELECT id, $1, 'test' FROM issuers",
        retired,
    )
    status = ct_status()
    assert status.returncode == 0, status.stdout + status.stderr
    assert "old: 1 (1 not repaired, 1 of them retired)" in status.stdout
    # an open gap that is not retired still makes the check fail
    await sql(
        database,
        "INSERT INTO coverage_gaps (issuer_id, serial, detected_by) "
        "SELECT id, $1, 'test' FROM issuers",
        live,
    )
    status = ct_status()
    assert status.returncode == 2, status.stdout + status.stderr
    assert "old: 2 (2 not repaired, 1 of them retired)" in status.stdout


async def test_open_gap_count_looks_gaps_up_by_key_not_by_scanning_the_index(
    database: str,
) -> None:
    """serve counts the open gaps every health_check_interval. With a few thousand open
    (an issuer without a key, retired rows that accumulate) the joins were planned as
    hashes of certificates and ct_index whole: a sequential scan of the CT index (the
    CA's every serial) each time. The count must stay the same."""
    await sql(
        database,
        "INSERT INTO issuers (spki_sha256, name, subject) VALUES ($1, 'big', 'CN=big')",
        bytes(32),
    )
    await sql(
        database,
        "INSERT INTO ct_logs (log_id, name, url) VALUES ($1, 'l', 'http://l')",
        bytes(32),
    )
    await sql(
        database,
        "INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, logged_at) "
        "SELECT i.id, int8send(g), 1, g, 1, now() FROM issuers i, generate_series(1, 20000) g",
    )
    await sql(
        database,
        "INSERT INTO certificates (issuer_id, serial, not_after, kinds) "
        "SELECT i.id, int8send(g), now() + CASE WHEN g % 8 = 1 THEN interval '-30 days' "
        "  ELSE interval '30 days' END, 1 "
        "FROM issuers i, generate_series(1, 20000, 2) g",
    )
    await sql(
        database,
        "INSERT INTO coverage_gaps (issuer_id, serial, log, detected_by) "
        "SELECT i.id, int8send(g), 1, 'test' FROM issuers i, generate_series(1, 20000, 4) g",
    )
    await sql(database, "ANALYZE")
    retired_before = dt.datetime.now(dt.UTC) - dt.timedelta(days=7)
    for with_not_after in (True, False):
        query = open_gaps_query(with_not_after)
        plan = "\n".join(r[0] for r in await sql(database, "EXPLAIN " + query, retired_before))
        assert "Seq Scan on ct_index" not in plan and "Seq Scan on certificates" not in plan, plan
        [row] = await sql(database, query, retired_before)
        assert row["open"] == 2500  # 5,000 open, half of them expired 30 days ago
