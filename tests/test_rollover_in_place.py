"""A responder certificate replaced in place: the new one configured, the old one removed.

The documented rollover keeps both configured until the refresher has re-signed what the
old one signed (tests/test_rollover.py). The shortest configuration has one
``responder_certificate``, and replacing it (a compromised key, an expiring certificate)
must not leave days of responses signed by a certificate the configuration no longer
names: they are rollover work too. An instance still running the OLD configuration (a
rolling restart) must not re-sign what the new certificate signed (no ping-pong).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from signer.demo_ca import make_responder_certificate, new_key, write_pem_cert
from signer.keys import write_pem_key
from tests.stored_rows import issuer_with_responder, load_issuer, put_row, sign_at, stored
from tests.support import (
    IssuerFiles,
    build_request,
    check_response,
    get_url,
    run_cli,
    write_config,
)


def refresh(config: Path) -> str:
    result = run_cli(config, "refresh")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_replaced_responder_rows_are_resigned_and_not_back(database, workdir, tmp_path):  # type: ignore[no-untyped-def]
    import httpx

    old = issuer_with_responder(
        "inplace", workdir, valid_from=dt.timedelta(days=30), valid_for=dt.timedelta(days=60)
    )
    old_proc = write_config(tmp_path / "old", database, [old], extra="refresher = false\n")
    cert = old.ca.issue_leaf("in-place.test")
    old_proc.start()
    try:
        assert old_proc.record(cert).status_code == 201
    finally:
        old_proc.stop()
    issuer = load_issuer(old_proc.config_path, old.name, database)
    # signed by the old certificate yesterday: valid for 3 more days, due in a day
    yesterday = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)
    put_row(database, issuer, cert.serial_number, sign_at(issuer, cert.serial_number, yesterday))
    old_fingerprint = stored(database, issuer, cert.serial_number)["signer"]

    # the new certificate and key replace the old ones in the same files' place
    key = new_key("p256")
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=3)
    new_cert = make_responder_certificate(old.ca.ca_cert, old.ca.ca_key, key, not_before=start)
    new_dir = tmp_path / "new-responder"
    new = IssuerFiles(
        old.name, dataclasses.replace(old.ca, responder_cert=new_cert, responder_key=key), new_dir
    )
    new_dir.mkdir()
    for name in ("issuing-ca.pem", "root.pem", "chain.pem"):
        (new_dir / name).write_bytes((old.directory / name).read_bytes())
    write_pem_cert(new_dir / "responder.pem", new_cert)
    write_pem_key(new_dir / "responder.key", key)
    new_config = write_config(tmp_path / "new", database, [new], extra="refresher = false\n")

    out = refresh(new_config.config_path)
    assert "rollover: 1" in out, out
    row = stored(database, issuer, cert.serial_number)
    assert row["signer"] != old_fingerprint
    new_proc = new_config.start()
    try:
        answer = httpx.get(get_url(new_proc.url, build_request(cert, old.ca.ca_cert)))
        assert answer.content == row["der"]
        check_response(answer.content, issuer=new, serial=cert.serial_number)  # new signer
    finally:
        new_proc.stop()

    # an instance not yet restarted (old configuration) leaves the new signer's rows alone
    out = refresh(old_proc.config_path)
    assert "rollover" not in out, out
    assert stored(database, issuer, cert.serial_number)["der"] == row["der"]
