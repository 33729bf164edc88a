"""Read replicas and several instances: a real streaming replica, three real responders.

The primary and its replica are started here (pg_basebackup -R, replaying continuously);
replay is paused to make the replica lag on purpose. Responders read from the replica and
write to the primary; no lag, stop or revocation may make them answer wrongly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509

from responder.schema import migrate
from responder.store import serial_key
from tests.pgcluster import PgCluster
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    run_async,
    write_config,
)


@pytest.fixture(scope="module")
def primary() -> Iterator[PgCluster]:
    cluster = PgCluster().init().start()
    cluster.psql("CREATE DATABASE ocsp")
    run_async(migrate(cluster.dsn("ocsp")))
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def replica(primary: PgCluster) -> Iterator[PgCluster]:
    cluster = primary.make_replica().start()
    cluster.wait_ready()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def instances(primary, replica, p256_issuer, workdir) -> Iterator[list[ResponderProcess]]:  # type: ignore[no-untyped-def]
    """Three responders, each reading from the replica and writing to the primary."""
    extra = f'replica_urls = ["{replica.dsn("ocsp")}"]\nreplica_max_lag = "30s"\n'
    procs = [
        write_config(workdir / f"inst{i}", primary.dsn("ocsp"), [p256_issuer], extra=extra).start()
        for i in range(3)
    ]
    yield procs
    for proc in procs:
        proc.stop()


def status_of(proc: ResponderProcess, issuer: IssuerFiles, cert) -> str:  # type: ignore[no-untyped-def]
    resp = httpx.get(get_url(proc.url, build_request(cert, issuer.ca.ca_cert)), timeout=10)
    if resp.content == b"\x30\x03\x0a\x01\x06":
        return "unauthorized"
    checked = check_response(
        resp.content, issuer=issuer, serial=cert.serial_number, expect=_expected(resp.content)
    )
    return checked.status.name.lower()


def _expected(der: bytes) -> str:
    from cryptography.x509 import ocsp

    return ocsp.load_der_ocsp_response(der).certificate_status.name.lower()


def wait_for(predicate, timeout: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def wait_replayed(replica: PgCluster, cert: x509.Certificate) -> None:
    """Until the replica has replayed the stored response of ``cert`` (recorded on the
    primary): it really is a streaming standby, and holds that row from now on."""
    hexkey = serial_key(cert.serial_number).hex()
    wait_for(
        lambda: (
            replica.psql(
                f"SELECT count(*) FROM responses WHERE serial = '\\x{hexkey}'", database="ocsp"
            ).strip()
            == "1"
        )
    )


def test_replica_is_used_and_streaming(instances, replica, p256_issuer):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("stream.test")
    assert instances[0].record(cert).status_code == 201
    # the replica replays the recording (it really is a streaming standby)
    wait_replayed(replica, cert)
    assert replica.psql("SELECT pg_is_in_recovery()", database="ocsp").strip() == "t"
    for proc in instances:
        assert status_of(proc, p256_issuer, cert) == "good"
        ready = httpx.get(proc.url + "/readyz")
        assert ready.status_code == 200 and "replicas 1/1 healthy" in ready.text


def test_fresh_recording_answered_while_replica_lags(instances, replica, p256_issuer):  # type: ignore[no-untyped-def]
    replica.pause_replay()
    try:
        cert = p256_issuer.ca.issue_leaf("lag.test")
        assert instances[1].record(cert).status_code == 201
        # not on the replica yet: every instance must still answer good at once
        for proc in instances:
            assert status_of(proc, p256_issuer, cert) == "good"
    finally:
        replica.resume_replay()


def test_revocation_reaches_every_instance_within_a_second(instances, replica, p256_issuer):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("revoke-all.test")
    assert instances[0].record(cert).status_code == 201
    for proc in instances:  # everyone has it cached as good
        assert status_of(proc, p256_issuer, cert) == "good"
    replica.pause_replay()  # the replica keeps the stale "good" row
    try:
        r = instances[2].revoke("p256", cert.serial_number)
        assert r.status_code == 201, r.text
        for proc in instances:
            elapsed = wait_for(lambda p=proc: status_of(p, p256_issuer, cert) == "revoked", 1.0)
            assert elapsed <= 1.0
        # and it stays revoked while the replica still lags
        time.sleep(0.5)
        for proc in instances:
            assert status_of(proc, p256_issuer, cert) == "revoked"
    finally:
        replica.resume_replay()


def test_instances_agree(instances, p256_issuer):  # type: ignore[no-untyped-def]
    certs = [p256_issuer.ca.issue_leaf(f"agree{i}.test") for i in range(6)]
    for i, cert in enumerate(certs):
        assert instances[i % 3].record(cert).status_code == 201
    for i, cert in enumerate(certs[:3]):
        assert instances[(i + 1) % 3].revoke("p256", cert.serial_number).status_code == 201
    time.sleep(1.0)
    for cert_index, cert in enumerate(certs):
        expected = "revoked" if cert_index < 3 else "good"
        assert [status_of(p, p256_issuer, cert) for p in instances] == [expected] * 3


def test_replica_down_falls_back_to_primary(instances, replica, p256_issuer):  # type: ignore[no-untyped-def]
    replica.stop()
    try:
        # each instance sees it down at its own next probe (every 0.2 s, at its own
        # phase): the first one to say so is up to a probe ahead of the others
        for proc in instances:
            wait_for(lambda p=proc: "replicas 0/1 healthy" in httpx.get(p.url + "/readyz").text)
        cert = p256_issuer.ca.issue_leaf("down.test")
        assert instances[0].record(cert).status_code == 201
        for proc in instances:
            assert status_of(proc, p256_issuer, cert) == "good"
            ready = httpx.get(proc.url + "/readyz")
            assert ready.status_code == 200 and "replicas 0/1 healthy" in ready.text
            metrics = httpx.get(proc.admin_url + "/metrics").text
            assert 'ocsp_db_replica_up{replica="replica0"} 0.0' in metrics
    finally:
        replica.start()
    wait_for(lambda: "replicas 1/1 healthy" in httpx.get(instances[0].url + "/readyz").text, 20)
    metrics = httpx.get(instances[0].admin_url + "/metrics").text
    assert 'ocsp_db_replica_up{replica="replica0"} 1.0' in metrics


def test_instance_started_after_a_revocation_never_reads_the_lagging_replica_good(  # type: ignore[no-untyped-def]
    instances, primary, replica, p256_issuer, workdir
):
    """A process that starts (a new instance, a respawned worker) after a revocation was
    acknowledged heard no notification for it: its first LISTEN must keep it off a replica
    that has not replayed the revocation, as a reconnection does. (No warm-up: it reads
    the primary and would hide what the lookups read.)"""
    cert = p256_issuer.ca.issue_leaf("late-start.test")
    assert instances[0].record(cert).status_code == 201
    wait_replayed(replica, cert)
    replica.pause_replay()  # the replica keeps the "good" row
    late = None
    try:
        assert instances[1].revoke("p256", cert.serial_number).status_code == 201
        extra = (
            f'replica_urls = ["{replica.dsn("ocsp")}"]\nreplica_max_lag = "30s"\n'
            "warmup_responses = 0\n"
        )
        late = write_config(workdir / "late", primary.dsn("ocsp"), [p256_issuer], extra=extra)
        late.start()
        assert "replicas 1/1 healthy" in httpx.get(late.url + "/readyz").text
        for alg in ("sha1", "sha256", "sha384", "sha512"):
            request = build_request(cert, p256_issuer.ca.ca_cert, alg=alg)
            answers = [
                httpx.get(get_url(late.url, request), timeout=10).content,
                httpx.post(
                    late.url,
                    content=request,
                    headers={"content-type": "application/ocsp-request"},
                    timeout=10,
                ).content,
            ]
            for der in answers:
                assert _expected(der) == "revoked", alg
                check_response(
                    der, issuer=p256_issuer, serial=cert.serial_number, alg=alg, expect="revoked"
                )
    finally:
        replica.resume_replay()
        if late is not None:
            late.stop()


def test_revocation_while_the_listener_is_away_is_not_read_from_a_lagging_replica(  # type: ignore[no-untyped-def]
    instances, primary, replica, p256_issuer
):
    """While an instance's listener is away it reads the store instead of its cache; that
    read must not go to a replica that has not replayed a revocation it never heard of."""
    cert = p256_issuer.ca.issue_leaf("away.replica.test")
    assert instances[0].record(cert).status_code == 201
    from responder.invalidation import APPLICATION_NAME

    wait_replayed(replica, cert)
    assert status_of(instances[1], p256_issuer, cert) == "good"
    replica.pause_replay()  # keeps the "good" row (and, paused, not the ALTER below)
    primary.psql("ALTER DATABASE ocsp WITH ALLOW_CONNECTIONS false")  # no reconnection
    try:
        primary.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name = '{APPLICATION_NAME}' AND datname = 'ocsp'"
        )
        assert instances[0].revoke("p256", cert.serial_number).status_code == 201
        for alg in ("sha1", "sha256", "sha384", "sha512"):
            request = build_request(cert, p256_issuer.ca.ca_cert, alg=alg)
            der = httpx.get(get_url(instances[1].url, request), timeout=10).content
            assert _expected(der) == "revoked", alg
    finally:
        primary.psql("ALTER DATABASE ocsp WITH ALLOW_CONNECTIONS true")
        replica.resume_replay()
    # the listeners come back, and so do the replica reads
    wait_for(
        lambda: (
            primary.psql(
                "SELECT count(*) FROM pg_stat_activity "
                f"WHERE application_name = '{APPLICATION_NAME}' AND datname = 'ocsp'"
            ).strip()
            == "3"
        ),
        20,
    )
