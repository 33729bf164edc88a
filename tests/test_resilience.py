"""PostgreSQL goes away in the middle of a run, then comes back.

While it is down, `serve` keeps answering what its in-process cache holds, answers
tryLater (never stale or unknown) for the rest, reports not-ready, and refuses recording
and revocation with 503 JSON, committing nothing. After the restart the pool reconnects
and everything resumes. Uses its own PostgreSQL cluster (it is stopped mid-test).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.x509 import ocsp

from responder.protocol import TRY_LATER
from responder.store import serial_key
from tests.pgcluster import PgCluster
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    create_database,
    get_url,
    sql_sync,
    write_config,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    pg = PgCluster().init().start()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="module")
def resilient(
    cluster: PgCluster, p256_issuer: IssuerFiles, workdir: Path
) -> Iterator[tuple[ResponderProcess, str]]:
    dsn = create_database(cluster.dsn())
    proc = write_config(
        workdir / "resilience",
        dsn,
        [p256_issuer],
        extra='health_check_interval = "1s"\npath_prefix = "/ocsp"\nrefresher_interval = "1s"\n',
    ).start()
    try:
        yield proc, dsn
    finally:
        proc.stop()


def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError("condition not reached in time")


def ocsp_get(proc: ResponderProcess, der: bytes) -> httpx.Response:
    # a generous client timeout: the assertion is that the server answers, not how fast
    return httpx.get(get_url(proc.url, der, prefix="/ocsp"), timeout=30)


def test_database_outage_and_recovery(resilient, cluster, p256_issuer):  # type: ignore[no-untyped-def]
    proc, dsn = resilient
    ca = p256_issuer.ca
    cached = ca.issue_leaf("cached.test")
    uncached = ca.issue_leaf("uncached.test")
    for cert in (cached, uncached):
        assert proc.record(cert).status_code == 201
    cached_req = build_request(cached, ca.ca_cert)
    check_response(
        ocsp_get(proc, cached_req).content, issuer=p256_issuer, serial=cached.serial_number
    )
    assert httpx.get(proc.url + "/readyz").status_code == 200

    cluster.stop("fast")
    try:
        # the cache keeps answering, with the same signed bytes
        for _ in range(3):
            resp = ocsp_get(proc, cached_req)
            assert resp.status_code == 200
            check_response(resp.content, issuer=p256_issuer, serial=cached.serial_number)
        # what the cache does not hold: tryLater, unsigned and not cacheable
        resp = ocsp_get(proc, build_request(uncached, ca.ca_cert))
        assert resp.status_code == 200 and resp.content == TRY_LATER
        assert resp.headers["cache-control"] == "no-cache"
        assert (
            ocsp.load_der_ocsp_response(resp.content).response_status
            == ocsp.OCSPResponseStatus.TRY_LATER
        )
        # not ready, on both listeners, naming the database
        plain = httpx.get(proc.url + "/readyz", timeout=30)
        assert plain.status_code == 503 and "database: unreachable" in plain.text
        body = httpx.get(proc.admin_url + "/readyz", timeout=30).json()
        assert body["ready"] is False and body["checks"]["database"]["ok"] is False
        assert httpx.get(proc.url + "/healthz").status_code == 200  # alive all the same
        # recording and revocation fail closed: 503 with a clear JSON error
        late = ca.issue_leaf("late.test")
        resp = proc.record(late)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"].startswith("not recorded: record certificates: database")
        resp = proc.revoke("p256", cached.serial_number)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"].startswith("not revoked:")
        assert resp.headers["retry-after"] == "1"  # as for recording: try again
        # the background refresher says what failed in one line (no traceback: below)
        wait_until(lambda: "refresher pass failed: database: " in proc.log())
    finally:
        cluster.start()

    # the pool reconnects by itself; readiness comes back
    wait_until(lambda: httpx.get(proc.url + "/readyz", timeout=10).status_code == 200)
    # nothing was committed while the database was away
    assert not sql_sync(
        dsn, "SELECT 1 FROM certificates WHERE serial = $1", serial_key(late.serial_number)
    )
    assert not sql_sync(dsn, "SELECT 1 FROM revocations")
    # everything resumes: recording, lookups, revocation (and the cache is dropped for it)
    assert proc.record(late).status_code == 201
    for cert in (late, uncached):
        check_response(
            ocsp_get(proc, build_request(cert, ca.ca_cert)).content,
            issuer=p256_issuer,
            serial=cert.serial_number,
        )
    assert proc.revoke("p256", cached.serial_number).status_code == 201
    check_response(
        ocsp_get(proc, cached_req).content,
        issuer=p256_issuer,
        serial=cached.serial_number,
        expect="revoked",
    )
    assert "Traceback" not in proc.log()
