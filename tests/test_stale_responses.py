"""A response past nextUpdate is never served (BR 4.9.9, RFC 5019).

Due for renewal, a stored response is re-signed on demand. If signing fails for real (the
responder certificate expires too soon for an 8-hour response, so ``sign_response``
refuses), the still-valid stored bytes are served until their nextUpdate, and after it the
answer is ``tryLater`` (unsigned, no-cache): never the stale bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.x509 import ocsp

from responder.protocol import TRY_LATER
from signer.response_builder import ValidityPolicy
from tests.stored_rows import (
    issuer_with_responder,
    load_issuer,
    put_certificate,
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
    write_config,
)

NO_REFRESHER = "refresher = false\n"


@pytest.fixture(scope="module")
def expiring_issuer(workdir: Path) -> IssuerFiles:
    """A CA whose delegated responder certificate expires in 6 h 50 min: with 1 h of
    backdating a new response could be valid only 7 h 50 min, so signing is refused."""
    return issuer_with_responder(
        "expiring",
        workdir,
        valid_from=dt.timedelta(days=2),
        valid_for=dt.timedelta(days=2, hours=6, minutes=50),
    )


@pytest.fixture(scope="module")
def seasoned_issuer(workdir: Path) -> IssuerFiles:
    """A CA whose responder has been valid for 30 days: responses "from last week" exist."""
    return issuer_with_responder(
        "seasoned", workdir, valid_from=dt.timedelta(days=30), valid_for=dt.timedelta(days=365)
    )


@pytest.fixture(scope="module")
def stale_responder(
    module_database: str, seasoned_issuer: IssuerFiles, expiring_issuer: IssuerFiles, workdir: Path
) -> Iterator[ResponderProcess]:
    proc = write_config(
        workdir / "stale", module_database, [seasoned_issuer, expiring_issuer], extra=NO_REFRESHER
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def get(responder: ResponderProcess, der: bytes) -> httpx.Response:
    response = httpx.get(get_url(responder.url, der), timeout=10)
    assert response.status_code == 200
    return response


def test_expired_row_is_resigned_on_demand(stale_responder, seasoned_issuer, module_database):  # type: ignore[no-untyped-def]
    cert = seasoned_issuer.ca.issue_leaf("expired-row.test")
    assert stale_responder.record(cert).status_code == 201
    issuer = load_issuer(stale_responder.config_path, seasoned_issuer.name, module_database)
    now = dt.datetime.now(dt.UTC)
    old = sign_at(issuer, cert.serial_number, now - dt.timedelta(days=5))
    assert old.next_update < now.timestamp()  # the refresher died long ago
    put_row(module_database, issuer, cert.serial_number, old)
    answer = get(stale_responder, build_request(cert, seasoned_issuer.ca.ca_cert))
    assert answer.content != old.der
    checked = check_response(answer.content, issuer=seasoned_issuer, serial=cert.serial_number)
    assert checked.response.next_update_utc > now
    # written back: the next instance finds it pre-signed
    assert stored(module_database, issuer, cert.serial_number)["der"] == answer.content


def test_signing_refused_past_next_update_is_try_later(  # type: ignore[no-untyped-def]
    stale_responder, expiring_issuer, module_database
):
    issuer = load_issuer(stale_responder.config_path, expiring_issuer.name, module_database)
    cert = expiring_issuer.ca.issue_leaf("refused.test")
    # recording needs a signature, which this responder refuses: a real failure
    refused = stale_responder.record(cert)
    assert refused.status_code == 503 and "too soon" in refused.json()["error"]
    put_certificate(module_database, issuer, cert)
    now = dt.datetime.now(dt.UTC)
    short = ValidityPolicy(validity=dt.timedelta(hours=8), refresh_margin=dt.timedelta(hours=4))
    expired = sign_at(issuer, cert.serial_number, now - dt.timedelta(hours=10), policy=short)
    assert expired.next_update < now.timestamp()
    put_row(module_database, issuer, cert.serial_number, expired)
    der = build_request(cert, expiring_issuer.ca.ca_cert)
    for _ in range(2):
        answer = get(stale_responder, der)
        assert answer.content == TRY_LATER
        assert answer.headers["cache-control"] == "no-cache"
    # a SHA-256 CertID (always signed on demand) gets the same answer
    assert (
        get(stale_responder, build_request(cert, expiring_issuer.ca.ca_cert, alg="sha256")).content
        == TRY_LATER
    )
    assert "too soon for a response valid 8h" in stale_responder.log()


def test_signing_refused_before_next_update_serves_valid_bytes(  # type: ignore[no-untyped-def]
    stale_responder, expiring_issuer, module_database
):
    issuer = load_issuer(stale_responder.config_path, expiring_issuer.name, module_database)
    cert = expiring_issuer.ca.issue_leaf("still-valid.test")
    put_certificate(module_database, issuer, cert)
    now = dt.datetime.now(dt.UTC)
    # signed 6.5 h ago: nextUpdate capped at the responder's notAfter (now + 6h50m), a
    # 14h20m response due at half its validity (BR 4.9.9 < 16 h), i.e. 20 min ago
    due = sign_at(issuer, cert.serial_number, now - dt.timedelta(hours=6, minutes=30))
    assert due.next_update == int(expiring_issuer.ca.responder_cert.not_valid_after_utc.timestamp())
    put_row(module_database, issuer, cert.serial_number, due)
    answer = get(stale_responder, build_request(cert, expiring_issuer.ca.ca_cert))
    assert answer.content == due.der  # re-signing failed: the still-valid bytes
    parsed = ocsp.load_der_ocsp_response(answer.content)
    assert parsed.next_update_utc is not None and parsed.next_update_utc > now
    max_age = int(answer.headers["cache-control"].split(",")[0].removeprefix("max-age="))
    assert max_age <= due.next_update - now.timestamp() - 60


def test_refresh_exits_2_when_an_issuer_cannot_sign(  # type: ignore[no-untyped-def]
    stale_responder, expiring_issuer, module_database
):
    """README: ``refresh`` exits 2 if an issuer cannot sign (a cron or monitoring job
    relies on it), naming the issuer; nothing tested it."""
    issuer = load_issuer(stale_responder.config_path, expiring_issuer.name, module_database)
    cert = expiring_issuer.ca.issue_leaf("refresh-refused.test")
    put_certificate(module_database, issuer, cert)
    short = ValidityPolicy(validity=dt.timedelta(hours=8), refresh_margin=dt.timedelta(hours=4))
    due = sign_at(
        issuer, cert.serial_number, dt.datetime.now(dt.UTC) - dt.timedelta(hours=6), policy=short
    )
    put_row(module_database, issuer, cert.serial_number, due)
    result = run_cli(stale_responder.config_path, "refresh")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"issuer {expiring_issuer.name}: FAILED" in result.stderr
