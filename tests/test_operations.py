"""Operating a responder: /metrics, /healthz, /readyz, and the admin listener's security.

One real `ocsp-responder serve` per module (health checks every second), a real database.
It serves OCSP under /ocsp so that /healthz and /readyz on the OCSP port are never taken
for a GET request whatever the hot path's routing order.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.parser import text_string_to_metric_families

from responder.store import serial_key
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    sql_sync,
    write_config,
)


@pytest.fixture(scope="module")
def ops_responder(
    module_database: str, p256_issuer: IssuerFiles, rsa_issuer: IssuerFiles, workdir: Path
) -> Iterator[ResponderProcess]:
    proc = write_config(
        workdir / "ops",
        module_database,
        [p256_issuer, rsa_issuer],
        extra='health_check_interval = "1s"\npath_prefix = "/ocsp"\n',
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def auth(proc: ResponderProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {proc.token}"}


def count_rows(dsn: str) -> tuple[int, int, int]:
    row = sql_sync(
        dsn,
        "SELECT (SELECT count(*) FROM certificates) AS c, (SELECT count(*) FROM responses) AS r,"
        " (SELECT count(*) FROM revocations) AS v",
    )[0]
    return row["c"], row["r"], row["v"]


# --- metrics ---------------------------------------------------------------------------


def test_metrics_on_admin_listener(ops_responder, p256_issuer):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("metrics.test")
    assert ops_responder.record(cert).status_code == 201
    assert ops_responder.record(cert).status_code == 200
    assert ops_responder.revoke("p256", cert.serial_number).status_code == 201
    # a SHA-256 CertID is signed on demand: the live path's signing is timed too
    der = build_request(cert, p256_issuer.ca.ca_cert, alg="sha256")
    check_response(
        httpx.get(get_url(ops_responder.url, der, prefix="/ocsp")).content,
        issuer=p256_issuer,
        serial=cert.serial_number,
        alg="sha256",
        expect="revoked",
    )
    resp = httpx.get(ops_responder.admin_url + "/metrics")  # no token needed: read-only
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    # revocation signed one response, the live path one (recording may use a template)
    assert metric(text, "ocsp_signing_seconds_count", issuer="p256") >= 2
    assert metric(text, "ocsp_signing_seconds_bucket", issuer="p256", le="+Inf") >= 2
    assert metric(text, "ocsp_revocations_total", issuer="p256") == 1
    # gauges sampled by the health monitor
    assert metric(text, "ocsp_db_pool_connections", pool="main", state="max") == 10
    assert metric(text, "ocsp_db_pool_connections", pool="main", state="open") >= 1
    assert ("ocsp_signing_queue_depth", ()) in samples(text)
    assert metric(text, "ocsp_responses_overdue_refresh") == 0
    # the age of the responses served (docs/deploy.md's "response too old" alert), counted
    # by the hot path and flushed each second
    deadline = time.monotonic() + 5
    while metric(text, "ocsp_response_age_seconds_count") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        text = httpx.get(ops_responder.admin_url + "/metrics").text
    assert metric(text, "ocsp_response_age_seconds_count") >= 1
    # just signed (thisUpdate backdated by this_update_backdate, 1 h): within 6 h
    assert metric(text, "ocsp_response_age_seconds_bucket", le="21600.0") >= 1


def test_metrics_not_on_ocsp_port(ops_responder):  # type: ignore[no-untyped-def]
    """The public port serves OCSP and health only: no /metrics there."""
    for path in ("/metrics", "/ocsp/metrics"):
        resp = httpx.get(ops_responder.url + path)
        assert b"ocsp_requests_total" not in resp.content
        assert not resp.headers["content-type"].startswith("text/plain; version=")


# --- health ----------------------------------------------------------------------------


def test_health_endpoints(ops_responder):  # type: ignore[no-untyped-def]
    assert httpx.get(ops_responder.url + "/healthz").status_code == 200
    ready = httpx.get(ops_responder.url + "/readyz")
    assert ready.status_code == 200 and ready.text.strip() == "ready"
    assert httpx.get(ops_responder.admin_url + "/healthz").json() == {"alive": True}
    for path in ("/healthz", "/readyz", "/metrics"):  # probes may use HEAD (no token either)
        head = httpx.head(ops_responder.admin_url + path)
        assert head.status_code == 200 and head.content == b"", path
    body = httpx.get(ops_responder.admin_url + "/readyz").json()
    assert body["ready"] is True
    assert body["checks"]["database"]["ok"] is True
    signers = body["checks"]["signers"]["issuers"]
    assert set(signers) == {"p256", "rsa"}
    assert all(s["ok"] and "signature verified at" in s["detail"] for s in signers.values())
    assert body["checks"]["responses"] == {
        "ok": True,
        "detail": "0 responses past their refresh deadline",
    }


def wait_for(predicate, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def test_response_past_refresh_deadline_makes_not_ready(  # type: ignore[no-untyped-def]
    ops_responder, p256_issuer, module_database
):
    cert = p256_issuer.ca.issue_leaf("stale.test")
    assert ops_responder.record(cert).status_code == 201
    key = serial_key(cert.serial_number)
    # the refresher "missed" it: a 4-day response with nextUpdate 1h away, far inside the
    # 2d refresh margin (a shorter one would be a capped response, due at its BR deadline)
    sql_sync(
        module_database,
        "UPDATE responses SET next_update = now() + interval '1 hour', "
        "this_update = now() - interval '3 days 23 hours' WHERE serial = $1",
        key,
    )
    try:
        body = wait_for(
            lambda: (
                (r := httpx.get(ops_responder.admin_url + "/readyz")).status_code == 503
                and r.json()
            )
        )
        assert body["checks"]["responses"] == {
            "ok": False,
            "detail": "1 responses past their refresh deadline",
        }
        plain = httpx.get(ops_responder.url + "/readyz")
        assert plain.status_code == 503
        assert "responses: 1 responses past their refresh deadline" in plain.text
        text = httpx.get(ops_responder.admin_url + "/metrics").text
        assert metric(text, "ocsp_responses_overdue_refresh") == 1
        assert metric(text, "ocsp_ready") == 0
        # an expired certificate's response needs no refresh: not counted
        sql_sync(
            module_database,
            "UPDATE certificates SET not_after = now() - interval '1 day' WHERE serial = $1",
            key,
        )
        wait_for(lambda: httpx.get(ops_responder.url + "/readyz").status_code == 200)
    finally:
        sql_sync(module_database, "DELETE FROM responses WHERE serial = $1", key)
    wait_for(lambda: httpx.get(ops_responder.url + "/readyz").status_code == 200)


# --- admin API security ----------------------------------------------------------------


def test_admin_api_needs_the_token_and_changes_nothing_without_it(  # type: ignore[no-untyped-def]
    ops_responder, p256_issuer, module_database
):
    cert = p256_issuer.ca.issue_leaf("noauth.test")
    pem = cert.public_bytes(Encoding.PEM)
    token = ops_responder.token
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": f"Token {token}"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Bearer {token.upper()}"},
        {"X-Admin-Token": token},
    ]
    before = count_rows(module_database)
    revocation = {"issuer": "p256", "serial": format(cert.serial_number, "x")}
    client = httpx.Client(base_url=ops_responder.admin_url)  # one connection for all
    for headers in bad_headers:
        for method, path, kwargs in (
            ("POST", "/v1/certificates", {"content": pem}),
            ("POST", "/v1/revocations", {"json": revocation}),
            ("PUT", "/v1/certificates", {"content": pem}),
            ("DELETE", "/v1/revocations", {}),
            ("GET", "/v1/certificates", {}),
            ("GET", "/docs", {}),
            ("GET", "/openapi.json", {}),
            ("POST", "/metrics", {}),
            ("GET", "/nope", {}),
        ):
            resp = client.request(method, path, headers=headers, **kwargs)
            assert resp.status_code == 401, (method, path, headers, resp.status_code)
            assert resp.headers["www-authenticate"] == "Bearer"
            assert resp.json() == {"error": "missing or wrong bearer token"}
    client.close()
    assert count_rows(module_database) == before
    # the same requests with the token work
    assert ops_responder.record(cert).status_code == 201


def test_admin_api_is_not_on_the_ocsp_port(ops_responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("wrongport.test")
    pem = cert.public_bytes(Encoding.PEM)
    before = count_rows(module_database)
    for path in ("/v1/certificates", "/v1/revocations"):
        resp = httpx.post(ops_responder.url + path, content=pem, headers=auth(ops_responder))
        assert resp.status_code in (404, 415), resp.status_code
        assert b"serial" not in resp.content
    resp = httpx.post(
        ops_responder.url + "/v1/certificates",
        content=pem,
        headers={**auth(ops_responder), "Content-Type": "application/ocsp-request"},
    )
    assert resp.status_code == 404
    assert count_rows(module_database) == before
    assert not sql_sync(
        module_database,
        "SELECT 1 FROM certificates WHERE serial = $1",
        serial_key(cert.serial_number),
    )


def test_admin_body_limits(ops_responder, module_database):  # type: ignore[no-untyped-def]
    before = count_rows(module_database)
    url = ops_responder.admin_url
    # declared too large: refused before reading
    big = b"A" * (64 * 1024 + 1)
    resp = httpx.post(url + "/v1/certificates", content=big, headers=auth(ops_responder))
    assert resp.status_code == 413 and "65536" in resp.json()["error"]

    # chunked (no Content-Length): refused once the limit is passed
    def chunks() -> Iterator[bytes]:
        for _ in range(80):
            yield b"B" * 1024

    resp = httpx.post(url + "/v1/certificates", content=chunks(), headers=auth(ops_responder))
    assert resp.status_code == 413
    resp = httpx.post(
        url + "/v1/revocations",
        content=b'{"issuer": "' + b"x" * (16 * 1024) + b'"}',
        headers=auth(ops_responder),
    )
    assert resp.status_code == 413
    assert count_rows(module_database) == before


def test_metrics_render_in_multiprocess_mode(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (serve --workers), two processes' samples aggregate."""
    script = (
        "from responder import metrics\n"
        "metrics.db_pool_connections.labels('main', 'open').set(3)\n"
        "metrics.readiness_ready.set(1)\n"
        "metrics.responses_overdue_refresh.set(2)\n"
        "metrics.signing_seconds.labels('r1').observe(0.001)\n"
        "import sys; sys.stdout.write(metrics.render()[0].decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        ).stdout
    assert metric(out, "ocsp_db_pool_connections", pool="main", state="open") == 6  # sum
    assert metric(out, "ocsp_ready") == 1  # min
    assert metric(out, "ocsp_responses_overdue_refresh") == 2  # max
    assert metric(out, "ocsp_signing_seconds_count", issuer="r1") == 2


def test_log_names_the_admin_port_it_really_got(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """``admin_listen`` with port 0 binds an ephemeral port: the startup line names that
    port (it said 0), and the admin API answers there."""
    proc = write_config(tmp_path, database, [p256_issuer], admin_port=0).start()
    try:
        # the OCSP port answers /healthz before the admin listener is up and the line written
        deadline = time.monotonic() + 10
        while (
            found := re.search(r"admin API: http://127\.0\.0\.1:(\d+)\)", proc.log())
        ) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert found is not None, proc.log()
        port = int(found.group(1))
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"alive": True}
    finally:
        proc.stop()


def two_workers(tmp_path: Path, database: str, issuer: IssuerFiles, extra: str) -> ResponderProcess:
    """A started `serve` with two workers sharing a metrics directory."""
    proc = write_config(tmp_path, database, [issuer], extra=f"workers = 2\n{extra}")
    proc.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    (tmp_path / "metrics").mkdir()
    return proc.start()


def ready_gauge(proc: ResponderProcess) -> float | None:
    """``ocsp_ready`` as worker 0's /metrics aggregates it (None before it listens)."""
    try:
        text = httpx.get(proc.admin_url + "/metrics", timeout=2).text
    except httpx.HTTPError:  # worker 0's admin listener may not be up yet
        return None
    return metric(text, "ocsp_ready")


def test_ready_gauge_is_current_without_probes(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """``ocsp_ready`` (the "not ready" alert of docs/deploy.md) follows the health monitor,
    not /readyz probes: with two workers and nothing probing, it stayed 0 for good (a
    false page), and it never turned 0 when a check started failing."""
    proc = two_workers(tmp_path, database, p256_issuer, 'health_check_interval = "1s"')
    try:
        wait_for(lambda: ready_gauge(proc) == 1)  # min over both workers, no /readyz call
        cert = p256_issuer.ca.issue_leaf("gauge.test")
        assert proc.record(cert).status_code == 201
        sql_sync(
            database,
            "UPDATE responses SET next_update = now() + interval '1 hour', "
            "this_update = now() - interval '3 days 23 hours' WHERE serial = $1",
            serial_key(cert.serial_number),
        )
        wait_for(lambda: ready_gauge(proc) == 0)
    finally:
        proc.stop()


def test_ready_gauge_is_known_soon_after_start(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """Right after start ``ocsp_ready`` said 0 until the first ``health_check_interval``
    had passed (30 s by default, an hour here) unless a /readyz probe reached every
    worker: a restart paged "not ready" (deploy.md's alert waits 2 minutes) while each
    worker was ready. The monitor now checks readiness at its first sample (5 s)."""
    proc = two_workers(tmp_path, database, p256_issuer, 'health_check_interval = "1h"')
    try:
        wait_for(lambda: ready_gauge(proc) == 1)  # nothing probes /readyz
    finally:
        proc.stop()


def test_alerted_counters_are_exported_at_zero(ops_responder) -> None:  # type: ignore[no-untyped-def]
    """The counters deploy.md's alerts take ``increase()`` of exist before their first
    event: a series born at 1 has no earlier sample, so the first serial collision (a
    page) or the first lost recording found in CT raised no alert."""
    found = samples(httpx.get(ops_responder.admin_url + "/metrics").text)
    names = {(name, labels) for name, labels in found}
    for reason in ("serial_collision", "connection", "refused", "unknown_issuer"):
        assert ("ocsp_recording_failures_total", (("reason", reason),)) in names
    for issuer in ("p256", "rsa"):
        assert ("coverage_gaps_total", (("issuer", issuer),)) in names
        assert (
            "ocsp_on_demand_signing_failures_total",
            (("error", "SigningError"), ("issuer", issuer)),
        ) in names
