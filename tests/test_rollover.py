"""Responder key rollover and the signer-notAfter cap.

A new delegated responder certificate is configured beside the old one: new responses are
signed by the new one at once, and the refresher re-signs everything the old one signed
(before the old certificate expires). nextUpdate never passes the signing certificate's
notAfter; a responder too close to expiry for an 8-hour response is refused
(tests/test_stale_responses.py shows the serving side of that refusal).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.x509 import ocsp

from signer.demo_ca import make_responder_certificate, new_key, write_pem_cert
from signer.keys import write_pem_key
from tests.stored_rows import issuer_with_responder, load_issuer, stored
from tests.support import (
    IssuerFiles,
    build_request,
    check_response,
    get_url,
    run_cli,
    write_config,
)


def signer_key_hash(der: bytes) -> bytes:
    return ocsp.load_der_ocsp_response(der).responder_key_hash  # type: ignore[return-value]


def key_hash_of(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]


def rollover_table(old: IssuerFiles, new_cert: Path, new_key: Path) -> str:
    return (
        "[[issuers]]\n"
        f'name = "{old.name}"\n'
        f'certificate = "{old.ca_pem}"\n'
        f'responders = [{{ certificate = "{old.directory / "responder.pem"}", '
        f'key = "{old.directory / "responder.key"}" }}, '
        f'{{ certificate = "{new_cert}", key = "{new_key}" }}]\n'
    )


def test_rollover_new_responses_use_new_responder_and_refresher_resigns_old(  # type: ignore[no-untyped-def]
    database, workdir, tmp_path
):
    old = issuer_with_responder(
        "rolling", workdir, valid_from=dt.timedelta(days=30), valid_for=dt.timedelta(days=60)
    )
    # step 1: only the old responder is configured
    proc = write_config(tmp_path, database, [old], extra="refresher = false\n").start()
    try:
        before = old.ca.issue_leaf("before.rollover.test")
        assert proc.record(before).status_code == 201
    finally:
        proc.stop()
    issuer = load_issuer(proc.config_path, old.name, database)
    assert signer_key_hash(stored(database, issuer, before.serial_number)["der"]) == key_hash_of(  # type: ignore[arg-type]
        old.ca.responder_cert
    )

    # step 2: issue the new responder certificate and configure it beside the old one
    new_key_obj = new_key("p256")
    new_cert = make_responder_certificate(
        old.ca.ca_cert, old.ca.ca_key, new_key_obj, name="Rolling new"
    )
    new_cert_path, new_key_path = tmp_path / "new-responder.pem", tmp_path / "new-responder.key"
    write_pem_cert(new_cert_path, new_cert)
    write_pem_key(new_key_path, new_key_obj)
    new_files = dataclasses.replace(
        old, ca=dataclasses.replace(old.ca, responder_cert=new_cert, responder_key=new_key_obj)
    )
    proc = write_config(
        tmp_path / "2",
        database,
        [],
        # no warm-up: it would load the old-signed response into memory, where it is
        # (validly) served until its renewal point; this test checks the store and a cold read
        extra="refresher = false\nwarmup_responses = 0\n"
        + rollover_table(old, new_cert_path, new_key_path),
    ).start()
    try:
        after = old.ca.issue_leaf("after.rollover.test")
        assert proc.record(after).status_code == 201
        der = build_request(after, old.ca.ca_cert)
        check_response(  # verified against the NEW responder certificate
            httpx.get(get_url(proc.url, der)).content, issuer=new_files, serial=after.serial_number
        )
        # step 3: one refresher pass re-signs what the old responder signed
        result = run_cli(proc.config_path, "refresh")
        assert result.returncode == 0, result.stderr
        assert "rollover: 1" in result.stdout
        row = stored(database, issuer, before.serial_number)
        check_response(row["der"], issuer=new_files, serial=before.serial_number)  # type: ignore[arg-type]
        served = httpx.get(get_url(proc.url, build_request(before, old.ca.ca_cert))).content
        assert signer_key_hash(served) == key_hash_of(new_cert)
    finally:
        proc.stop()


def test_next_update_capped_at_signer_not_after(database, workdir, tmp_path):  # type: ignore[no-untyped-def]
    """A responder certificate expiring in 2 days: responses are valid 4 days by
    configuration, but their nextUpdate is exactly the certificate's notAfter."""
    short = issuer_with_responder(
        "short-lived", workdir, valid_from=dt.timedelta(days=1), valid_for=dt.timedelta(days=3)
    )
    proc = write_config(tmp_path, database, [short], extra="refresher = false\n").start()
    try:
        cert = short.ca.issue_leaf("capped.test")
        recorded = proc.record(cert)
        assert recorded.status_code == 201
        not_after = short.ca.responder_cert.not_valid_after_utc
        assert recorded.json()["next_update"] == int(not_after.timestamp())
        for alg in ("sha1", "sha256"):
            body = httpx.get(
                get_url(proc.url, build_request(cert, short.ca.ca_cert, alg=alg))
            ).content
            checked = check_response(body, issuer=short, serial=cert.serial_number, alg=alg)
            assert checked.response.next_update_utc == not_after
            validity = not_after - checked.response.this_update_utc
            assert dt.timedelta(hours=8) <= validity < dt.timedelta(days=4)
    finally:
        proc.stop()
