"""Fail-closed recording: durable commits, 503 / non-zero exits when the database is gone,
and every failed write visible as an ERROR line (serial, issuer) and a counter."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from responder import metrics
from responder.schema import migrate
from responder.store import PresignedStore, RetryPolicy, StoreUnavailable, serial_key, with_retries
from signer.demo_ca import DemoCA, create_ca, write_pem_cert
from signer.issuers import IssuerRegistry, issuer_from_certificate, make_responder
from signer.presign import PresignedSigner
from signer.recording import CertificateRecorder, format_serial
from signer.response_builder import CertStatus, ValidityPolicy, sign_response
from tests.pgcluster import PgCluster
from tests.support import VENV_BIN, IssuerFiles, create_database, sql, write_config


def registry_for(ca: DemoCA, db_id: int = -1) -> IssuerRegistry:
    issuer = issuer_from_certificate("dw", ca.ca_cert)
    issuer.responders.append(
        make_responder(issuer, ca.responder_cert, ca.responder_key, delegated=True)
    )
    issuer.db_id = db_id
    return IssuerRegistry([issuer])


def counter(name: str, **labels: str) -> float:
    value = metrics.recording_failures_total.collect()[0] if name == "failures" else None
    family = value or metrics.recordings_total.collect()[0]
    for sample in family.samples:
        if sample.name.endswith("_total") and sample.labels == labels:
            return float(sample.value)
    return 0.0


async def test_writes_commit_synchronously_even_if_the_default_is_off(pg_admin_dsn: str) -> None:
    dsn = await asyncio.to_thread(create_database, pg_admin_dsn)
    dbname = dsn.rpartition("/")[2]
    await sql(dsn, f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    assert (await sql(dsn, "SHOW synchronous_commit"))[0][0] == "off"
    store = await PresignedStore.connect(dsn)
    try:
        for _ in range(3):  # every pooled session
            assert await store.pool.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await store.close()


async def test_recording_counts_and_durability(pg_admin_dsn: str, demo_ca: DemoCA) -> None:
    dsn = await asyncio.to_thread(create_database, pg_admin_dsn)
    store = await PresignedStore.connect(dsn)
    try:
        registry = registry_for(demo_ca)
        await store.register_issuers(registry.issuers)
        recorder = CertificateRecorder(registry, store, ValidityPolicy())
        before = counter("recordings", issuer="dw", result="created")
        cert = demo_ca.issue_leaf("count.test")
        (outcome,) = await recorder.record([cert, cert][:1])
        assert outcome.created
        assert counter("recordings", issuer="dw", result="created") == before + 1
        existing = counter("recordings", issuer="dw", result="existing")
        # the same serial twice in one call: new once, then existing
        twice = await recorder.record([demo_ca.issue_leaf("x.test", serial=7)] * 2)
        assert [o.created for o in twice] == [True, False]
        assert counter("recordings", issuer="dw", result="existing") == existing + 1
    finally:
        await store.close()


async def test_failed_write_logged_counted_and_raised(
    demo_ca: DemoCA, caplog: pytest.LogCaptureFixture
) -> None:
    """The database vanishes after connecting: ERROR per serial, counter, StoreUnavailable."""
    cluster = PgCluster().init().start()
    try:
        cluster.psql("CREATE DATABASE gone")
        dsn = cluster.dsn("gone")
        await migrate(dsn)
        store = await PresignedStore.connect(dsn)
        registry = registry_for(demo_ca)
        await store.register_issuers(registry.issuers)
        recorder = CertificateRecorder(registry, store, ValidityPolicy())
        cluster.stop("immediate")
        certs = [demo_ca.issue_leaf(f"gone{i}.test") for i in range(3)]
        before = counter("failures", reason="connection")
        with caplog.at_level(logging.ERROR), pytest.raises(StoreUnavailable):
            await recorder.record(certs)
        assert counter("failures", reason="connection") == before + 3
        for cert in certs:
            assert any(
                r.levelno == logging.ERROR
                and f"serial={format_serial(cert.serial_number)}" in r.getMessage()
                and "issuer=dw" in r.getMessage()
                and "not acknowledged" in r.getMessage()
                for r in caplog.records
            )
        store.pool.terminate()
    finally:
        cluster.destroy()


async def test_retries_are_bounded() -> None:
    calls = 0

    async def always_lost() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionResetError("lost")

    with pytest.raises(StoreUnavailable) as info:
        await with_retries(always_lost, "probe", RetryPolicy(attempts=3, first_delay=0.01))
    assert calls == 3 and info.value.reason == "connection"
    assert "after 3 attempts" in str(info.value)


def test_database_down_means_503_and_nonzero_exit(
    own_cluster: PgCluster, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    own_cluster.psql("CREATE DATABASE down")
    dsn = own_cluster.dsn("down")
    asyncio.run(migrate(dsn))
    proc = write_config(tmp_path, dsn, [p256_issuer]).start()
    try:
        ok = proc.record(p256_issuer.ca.issue_leaf("before.test"))
        assert ok.status_code == 201
        own_cluster.stop("immediate")
        cert = p256_issuer.ca.issue_leaf("during.test")
        single = proc.record(cert)
        assert single.status_code == 503, single.text
        assert single.json()["error"].startswith("not recorded: record certificates: database")
        batch = proc.record_batch(cert.public_bytes(serialization.Encoding.PEM))
        assert batch.status_code == 503 and "not recorded" in batch.json()["error"]
        log = proc.log()
        assert (
            f"recording FAILED (not acknowledged): issuer=p256 serial={format_serial(cert.serial_number)}"
            in log
        )
        pem = tmp_path / "during.pem"
        write_pem_cert(pem, cert)
        cmd = [str(VENV_BIN / "ocsp-responder")]
        for args in (["issue", str(pem)], ["import", "--no-journal", str(pem)]):
            result = subprocess.run(
                [*cmd, *args, "--config", str(proc.config_path)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 3, result.stderr
            assert "cannot connect to the database" in result.stderr
            assert "Traceback" not in result.stderr
        # the database comes back: the same certificate is recorded, nothing was half-done
        own_cluster.start()
        again = proc.record(cert)
        assert again.status_code == 201, again.text
    finally:
        proc.stop()


def test_cli_issue_reports_not_recorded_when_the_write_fails(
    own_cluster: PgCluster, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """The CLI connects fine, then the database refuses the write: exit 3, a clear line
    per file that was NOT recorded, and the serial in an ERROR line."""
    own_cluster.psql("CREATE DATABASE refuse")
    dsn = own_cluster.dsn("refuse")
    asyncio.run(migrate(dsn))
    own_cluster.psql(
        "CREATE ROLE no_insert LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO no_insert;"
        "GRANT INSERT ON issuers TO no_insert;",
        database="refuse",
    )
    proc = write_config(tmp_path, own_cluster.dsn("refuse", user="no_insert"), [p256_issuer])
    files = []
    for i in range(2):
        files.append(tmp_path / f"c{i}.pem")
        write_pem_cert(files[-1], p256_issuer.ca.issue_leaf(f"refused{i}.test"))
    result = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "issue", "--config", str(proc.config_path)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    assert f"{files[0]}: NOT recorded (do not publish)" in result.stderr
    assert "InsufficientPrivilegeError" in result.stderr
    assert f"{files[1]}: NOT recorded (not attempted)" in result.stderr
    assert "recording FAILED (not acknowledged): issuer=p256 serial=" in result.stderr
    assert "Traceback" not in result.stderr
    # no database at all: the same verdict for every file (it was one bare error line)
    unreachable = write_config(
        tmp_path / "down", "postgresql://nobody@127.0.0.1:1/none", [p256_issuer]
    )
    result = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "issue", "--config", str(unreachable.config_path)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    for f in files:
        assert f"{f}: NOT recorded (do not publish): cannot connect" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048"])
def test_presigned_template_matches_the_builder(kind: str) -> None:
    ca = create_ca(kind, f"T{kind}")
    registry = registry_for(ca)
    issuer = registry.issuers[0]
    signer = PresignedSigner(ValidityPolicy())
    import datetime as dt

    for serial in (1, 127, 128, 255, 256, 2**126 + 5, 2**159 - 1):
        # cryptography's builder stamps producedAt with the wall clock, not ``now``: sign
        # again when the clock passed a second boundary between the two signatures
        for _ in range(3):
            moment = dt.datetime.now(dt.UTC).replace(microsecond=0)
            fast = signer.sign_good(issuer, serial, now=moment)
            slow = sign_response(issuer, serial, CertStatus.GOOD, ValidityPolicy(), now=moment)
            b = ocsp.load_der_ocsp_response(slow.der)
            if b.produced_at_utc == moment:
                break
        a = ocsp.load_der_ocsp_response(fast.der)
        assert a.tbs_response_bytes == b.tbs_response_bytes
        assert (fast.this_update, fast.next_update) == (slow.this_update, slow.next_update)
        assert a.signature_algorithm_oid == b.signature_algorithm_oid
        assert [c.fingerprint(a.signature_hash_algorithm) for c in a.certificates] == [  # type: ignore[arg-type]
            c.fingerprint(b.signature_hash_algorithm)  # type: ignore[arg-type]
            for c in b.certificates
        ]
        key = ca.responder_cert.public_key()
        from cryptography.hazmat.primitives.asymmetric import ec, padding

        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(a.signature, a.tbs_response_bytes, ec.ECDSA(a.signature_hash_algorithm))  # type: ignore[arg-type]
        else:
            key.verify(  # type: ignore[union-attr]
                a.signature,
                a.tbs_response_bytes,
                padding.PKCS1v15(),  # type: ignore[arg-type]
                a.signature_hash_algorithm,  # type: ignore[arg-type]
            )
    _ = serial_key


async def test_signing_failure_is_logged_counted_and_nothing_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A responder certificate too close to expiry cannot sign 8 h of validity (BR 4.9.9):
    the call fails before any write, visibly."""
    import datetime as dt

    from signer.demo_ca import make_responder_certificate, new_key
    from signer.response_builder import SigningError

    ca = create_ca("p256", "Expiring")
    key = new_key("p256")
    soon = make_responder_certificate(
        ca.ca_cert,
        ca.ca_key,
        key,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
        lifetime=dt.timedelta(days=1, hours=4),
    )
    issuer = issuer_from_certificate("exp", ca.ca_cert)
    issuer.responders.append(make_responder(issuer, soon, key, delegated=True))
    recorder = CertificateRecorder(IssuerRegistry([issuer]), None, ValidityPolicy())  # type: ignore[arg-type]
    certs = [ca.issue_leaf(f"exp{i}.test") for i in range(2)]
    before = counter("failures", reason="signing")
    with caplog.at_level(logging.ERROR), pytest.raises(SigningError):
        await recorder.record(certs)
    assert counter("failures", reason="signing") == before + 2
    assert any(
        "recording FAILED (not acknowledged): could not prepare" in r.getMessage()
        and f"serial={format_serial(certs[0].serial_number)}" in r.getMessage()
        and "reason=signing" in r.getMessage()
        for r in caplog.records
    )
