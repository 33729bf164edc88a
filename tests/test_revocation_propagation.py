"""Revocation reaches every responder instance within 1 s (PostgreSQL LISTEN/NOTIFY).

Two `serve` processes share one database. Instance B caches a serial's "good"; the serial
is revoked through instance A (admin API) or the CLI; B must answer "revoked" within one
second. A listener that lost its connection clears its whole cache after reconnecting,
since notifications sent meanwhile are lost.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from responder.invalidation import APPLICATION_NAME
from responder.store import serial_key
from signer.demo_ca import random_serial
from tests.support import (
    VENV_BIN,
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    sql_sync,
    write_config,
)


@pytest.fixture(scope="module")
def two_instances(
    module_database: str, p256_issuer: IssuerFiles, workdir: Path
) -> Iterator[tuple[ResponderProcess, ResponderProcess]]:
    a = write_config(workdir / "a", module_database, [p256_issuer]).start()
    b = write_config(workdir / "b", module_database, [p256_issuer]).start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def status_via(instance: ResponderProcess, der: bytes) -> bytes:
    response = httpx.get(get_url(instance.url, der), timeout=10)
    assert response.status_code == 200
    return response.content


def wait_revoked(instance: ResponderProcess, der: bytes, issuer: IssuerFiles, serial: int) -> float:
    """Seconds until `instance` answers revoked; fails after 1 s."""
    start = time.monotonic()
    while True:
        body = status_via(instance, der)
        try:
            check_response(body, issuer=issuer, serial=serial, expect="revoked")
            return time.monotonic() - start
        except AssertionError:
            if time.monotonic() - start > 1.0:
                raise
            time.sleep(0.02)


def cache_good(instance: ResponderProcess, der: bytes, issuer: IssuerFiles, serial: int) -> None:
    for _ in range(2):  # the second answer comes from the in-process cache
        check_response(status_via(instance, der), issuer=issuer, serial=serial)


def test_revoke_through_a_is_seen_by_b_within_one_second(two_instances, p256_issuer):  # type: ignore[no-untyped-def]
    a, b = two_instances
    cert = p256_issuer.ca.issue_leaf("two.instances.test")
    assert a.record(cert).status_code == 201
    der = build_request(cert, p256_issuer.ca.ca_cert)
    cache_good(b, der, p256_issuer, cert.serial_number)
    cache_good(a, der, p256_issuer, cert.serial_number)
    start = time.monotonic()
    response = a.revoke(p256_issuer.name, cert.serial_number)
    assert response.status_code == 201, response.text
    assert response.json()["cdn_purge"] == "none"  # no hook configured here
    elapsed = time.monotonic() - start
    # A answers from its own (dropped) cache at once; B hears the NOTIFY
    check_response(
        status_via(a, der), issuer=p256_issuer, serial=cert.serial_number, expect="revoked"
    )
    assert wait_revoked(b, der, p256_issuer, cert.serial_number) + elapsed < 1.5


def test_cli_revoke_is_seen_by_running_instances(two_instances, p256_issuer):  # type: ignore[no-untyped-def]
    a, b = two_instances
    cert = p256_issuer.ca.issue_leaf("cli.revoke.test")
    assert a.record(cert).status_code == 201
    der = build_request(cert, p256_issuer.ca.ca_cert)
    cache_good(a, der, p256_issuer, cert.serial_number)
    cache_good(b, der, p256_issuer, cert.serial_number)
    result = subprocess.run(
        [
            str(VENV_BIN / "ocsp-responder"),
            "revoke",
            "--config",
            str(a.config_path),
            "--issuer",
            p256_issuer.name,
            "--serial",
            format(cert.serial_number, "x"),
            "--reason",
            "superseded",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for instance in (a, b):
        wait_revoked(instance, der, p256_issuer, cert.serial_number)


def test_revoking_an_unrecorded_serial_works(two_instances, p256_issuer):  # type: ignore[no-untyped-def]
    """A serial known only from elsewhere (e.g. the CT index) or not at all is revoked
    and answered revoked (the revocation makes it known)."""
    a, b = two_instances
    serial = random_serial()
    response = a.revoke(p256_issuer.name, serial, reason="keyCompromise")
    assert response.status_code == 201, response.text
    der = build_request(None, p256_issuer.ca.ca_cert, serial=serial)
    for instance in (a, b):
        check_response(
            status_via(instance, der), issuer=p256_issuer, serial=serial, expect="revoked"
        )


def test_listener_reconnect_clears_the_cache(two_instances, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    """A revocation whose notification B could not get (its listener connection was
    killed) is still seen by B: after reconnecting, B starts from an empty cache."""
    a, b = two_instances
    cert = p256_issuer.ca.issue_leaf("missed.notify.test")
    assert a.record(cert).status_code == 201
    der = build_request(cert, p256_issuer.ca.ca_cert)
    cache_good(b, der, p256_issuer, cert.serial_number)
    # kill every listener session: B's notifications from now on are lost
    sql_sync(
        module_database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        APPLICATION_NAME,
    )
    # a revocation without NOTIFY (what B misses): the record, and no stored response, so
    # the next lookup signs from the revocation
    sql_sync(
        module_database,
        "INSERT INTO revocations (issuer_id, serial, revoked_at, reason) "
        "SELECT issuer_id, serial, now(), 1 FROM certificates WHERE serial = $1",
        serial_key(cert.serial_number),
    )
    sql_sync(
        module_database, "DELETE FROM responses WHERE serial = $1", serial_key(cert.serial_number)
    )
    # B's cached "good" would last until its renewal point (days); B clears its cache when
    # the listener connection is lost and again after reconnecting, so it signs "revoked"
    deadline = time.monotonic() + 5
    while True:
        body = status_via(b, der)
        try:
            check_response(body, issuer=p256_issuer, serial=cert.serial_number, expect="revoked")
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    # both instances listen again (B no longer waits for it to answer from the store)
    deadline = time.monotonic() + 5
    while True:
        listeners = sql_sync(
            module_database,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1",
            APPLICATION_NAME,
        )
        if listeners[0]["n"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert listeners[0]["n"] == 2


def test_revocation_while_a_listener_is_away_is_answered_from_the_store(  # type: ignore[no-untyped-def]
    two_instances, p256_issuer, module_database, pg_admin_dsn
):
    """B's listener is gone and cannot come back (the database takes no new connections;
    B's pool keeps the ones it has): a revocation acknowledged meanwhile must not be
    answered "good" from B's cache, for any CertID hash, GET or POST. B's cache is not
    trusted while it hears no invalidations: it reads the store, which can answer."""
    a, b = two_instances
    cert = p256_issuer.ca.issue_leaf("listener.away.test")
    assert a.record(cert).status_code == 201
    requests = {
        alg: build_request(cert, p256_issuer.ca.ca_cert, alg=alg)
        for alg in ("sha1", "sha256", "sha384", "sha512")
    }
    for alg, der in requests.items():
        for _ in range(2):  # the second answer comes from B's cache
            body = status_via(b, der)
            check_response(body, issuer=p256_issuer, serial=cert.serial_number, alg=alg)
    name = module_database.rsplit("/", 1)[1].split("?")[0]
    sql_sync(pg_admin_dsn, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    try:
        sql_sync(
            pg_admin_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = $2",
            APPLICATION_NAME,
            name,
        )
        assert a.revoke("p256", cert.serial_number).status_code == 201
        for alg, der in requests.items():
            answers = [
                status_via(b, der),
                httpx.post(
                    b.url,
                    content=der,
                    headers={"content-type": "application/ocsp-request"},
                    timeout=10,
                ).content,
            ]
            for body in answers:
                check_response(
                    body, issuer=p256_issuer, serial=cert.serial_number, alg=alg, expect="revoked"
                )
    finally:
        sql_sync(pg_admin_dsn, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    stored = sql_sync(
        module_database,
        "SELECT status FROM responses WHERE serial = $1",
        serial_key(cert.serial_number),
    )
    assert [row["status"] for row in stored] == [1]
