"""Recording issuance through the admin API and the CLI: one code path, durable, idempotent."""

from __future__ import annotations

import base64
import re
import subprocess

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from responder.store import serial_key
from signer.demo_ca import create_ca, write_pem_cert
from signer.recording import CertificateRejected, split_certificates
from tests.support import VENV_BIN, build_request, check_response, get_url, sql_sync


def test_record_then_idempotent(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("rec.test")
    first = responder.record(cert)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["serial"] == format(cert.serial_number, "x").zfill(len(body["serial"]))
    assert int(body["serial"], 16) == cert.serial_number
    assert body["created"] is True and body["precertificate"] is False
    rows = sql_sync(
        module_database,
        "SELECT c.kinds, r.der FROM certificates c JOIN responses r USING (issuer_id, serial) "
        "WHERE serial = $1",
        serial_key(cert.serial_number),
    )
    assert len(rows) == 1
    check_response(rows[0]["der"], issuer=p256_issuer, serial=cert.serial_number)
    again = responder.record(cert, der=True)
    assert again.status_code == 200 and again.json()["created"] is False
    # the stored response was not replaced by the idempotent call
    rows2 = sql_sync(
        module_database,
        "SELECT der FROM responses WHERE serial = $1",
        serial_key(cert.serial_number),
    )
    assert rows2[0]["der"] == rows[0]["der"]


def test_precertificate_recognised(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    pre = p256_issuer.ca.issue_leaf("pre.test", precertificate=True)
    resp = responder.record(pre)
    assert resp.status_code == 201 and resp.json()["precertificate"] is True
    # the final certificate shares issuer and serial: already recorded
    final = p256_issuer.ca.issue_leaf("pre.test", serial=pre.serial_number)
    assert responder.record(final).status_code == 200
    kinds = sql_sync(
        module_database,
        "SELECT kinds FROM certificates WHERE serial = $1",
        serial_key(pre.serial_number),
    )
    assert kinds[0]["kinds"] == 3  # precertificate and certificate both seen
    der = build_request(pre, p256_issuer.ca.ca_cert)
    check_response(
        httpx.get(get_url(responder.url, der)).content, issuer=p256_issuer, serial=pre.serial_number
    )


def test_unconfigured_issuer_refused(responder):  # type: ignore[no-untyped-def]
    other = create_ca("p256", "Other")
    resp = responder.record(other.issue_leaf("other.test"))
    assert resp.status_code == 422
    assert "not configured" in resp.json()["error"]


def test_bad_bodies(responder, p256_issuer):  # type: ignore[no-untyped-def]
    url = responder.admin_url + "/v1/certificates"
    auth = {"Authorization": f"Bearer {responder.token}"}
    assert httpx.post(url, content=b"not a cert", headers=auth).status_code == 400
    assert httpx.post(url, content=b"", headers=auth).status_code == 400
    two = b"".join(
        p256_issuer.ca.issue_leaf(n).public_bytes(serialization.Encoding.PEM)
        for n in ("a.t", "b.t")
    )
    assert httpx.post(url, content=two, headers=auth).status_code == 400
    assert httpx.post(url, content=b"x" * 100_000, headers=auth).status_code == 413


def test_admin_auth(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("auth.test")
    body = cert.public_bytes(serialization.Encoding.PEM)
    url = responder.admin_url + "/v1/certificates"
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": responder.token},
    ):
        resp = httpx.post(url, content=body, headers=headers)
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == "Bearer"
    rows = sql_sync(
        module_database,
        "SELECT 1 FROM certificates WHERE serial = $1",
        serial_key(cert.serial_number),
    )
    assert rows == []  # nothing changed


def test_cli_issue_same_path(responder, p256_issuer, module_database, tmp_path):  # type: ignore[no-untyped-def]
    certs = [p256_issuer.ca.issue_leaf(f"cli{i}.test") for i in range(3)]
    pem = tmp_path / "bundle.pem"
    write_pem_cert(pem, *certs[:2])
    der = tmp_path / "one.der"
    der.write_bytes(certs[2].public_bytes(serialization.Encoding.DER))
    cmd = [str(VENV_BIN / "ocsp-responder"), "issue", "--config", str(responder.config_path)]
    result = subprocess.run([*cmd, str(pem), str(der)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": recorded") == 3
    for cert in certs:
        resp = httpx.get(get_url(responder.url, build_request(cert, p256_issuer.ca.ca_cert)))
        check_response(resp.content, issuer=p256_issuer, serial=cert.serial_number)
    again = subprocess.run([*cmd, str(der)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already recorded" in again.stdout
    # refusals: unreadable file, not a certificate, foreign issuer -> non-zero exit, clear message
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    foreign = tmp_path / "foreign.pem"
    write_pem_cert(foreign, create_ca("p256", "Foreign").issue_leaf("f.test"))
    bad = subprocess.run(
        [*cmd, str(junk), str(foreign), str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "junk.pem: refused: not a PEM or DER certificate" in bad.stderr
    assert "foreign.pem: refused: issuer" in bad.stderr and "not configured" in bad.stderr
    assert "missing: cannot read" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_revocation_api_rules(responder, p256_issuer):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("rules.test")
    assert responder.record(cert).status_code == 201
    hold = responder.revoke("p256", cert.serial_number, "certificateHold")
    assert hold.status_code == 400 and "certificateHold" in hold.json()["error"]
    assert responder.revoke("nope", cert.serial_number).status_code == 422
    ok = responder.revoke(
        "p256", cert.serial_number, "superseded", revoked_at="2026-01-02T03:04:05Z"
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["revoked_at"].startswith("2026-01-02T03:04:05")
    assert responder.revoke("p256", cert.serial_number, "superseded").status_code == 200


# --- strict PEM, the stored state reported, RFC 5280 serials -----------------------------


def pem_of(der: bytes, label: str = "CERTIFICATE") -> bytes:
    text = base64.encodebytes(der).decode().replace("\n", "")
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode()


def test_pem_reader_is_strict() -> None:
    """What lax readers skip silently is refused, naming the line and the defect."""
    ca = create_ca("p256", "Strict")
    a, b = (ca.issue_leaf(n).public_bytes(serialization.Encoding.DER) for n in ("a.t", "b.t"))
    good = pem_of(a) + b"\r\n  \n" + pem_of(b).replace(b"\n", b"\r\n")
    assert split_certificates(good) == [a, b]  # CRLF and blank lines between blocks are fine
    cases = {
        pem_of(a) + pem_of(b, "X509 CERTIFICATE") + pem_of(a): "'X509 CERTIFICATE' block",
        pem_of(a) + pem_of(b, "TRUSTED CERTIFICATE"): "'TRUSTED CERTIFICATE' block",
        pem_of(a) + pem_of(b)[:80]: "has no END line (truncated?)",
        pem_of(a).replace(b"-----END CERTIFICATE-----\n", b"") + pem_of(b): "has no END line (line",
        pem_of(a) + b"junk\n": "text outside a CERTIFICATE block",
        b"subject=CN = a.t\n" + pem_of(a): "line 1: text outside",
        pem_of(a) + b"-----END CERTIFICATE-----\n": "END without BEGIN",
        pem_of(a).replace(b"\n", b"\nProc-Type: 4,ENCRYPTED\n", 1): "not valid base64",
        pem_of(a).replace(b"-----\n", b"----\n", 1): "malformed boundary",
        b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n": "is empty",
    }
    for body, why in cases.items():
        with pytest.raises(CertificateRejected, match=re.escape(why)):
            split_certificates(body)
    # the old lax reader's view of the first case: it recorded 3, dropped nothing visibly
    assert len(x509.load_pem_x509_certificates(pem_of(a) + pem_of(b, "TRUSTED CERTIFICATE"))) == 1


def test_single_certificate_body_is_strict(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    url = responder.admin_url + "/v1/certificates"
    auth = {"Authorization": f"Bearer {responder.token}"}
    certs = [p256_issuer.ca.issue_leaf(f"strict{i}.test") for i in range(3)]
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    bodies = [
        (pems[0] + b"trailing junk\n", "text outside"),
        (pems[1] + pems[2][:100], "no END line"),
        (pems[2].replace(b"CERTIFICATE", b"X509 CERTIFICATE"), "'X509 CERTIFICATE' block"),
    ]
    for body, why in bodies:
        resp = httpx.post(url, content=body, headers=auth)
        assert resp.status_code == 400, resp.text
        assert why in resp.json()["error"]
    rows = sql_sync(
        module_database,
        "SELECT 1 FROM certificates WHERE serial = ANY($1::bytea[])",
        [serial_key(c.serial_number) for c in certs],
    )
    assert rows == []


def test_rerecording_reports_the_stored_response(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    """The answer says what OCSP serves: a revoked serial recorded (again) is revoked."""
    cert = p256_issuer.ca.issue_leaf("rerecord.test")
    assert responder.record(cert).status_code == 201
    assert responder.revoke("p256", cert.serial_number, "keyCompromise").status_code == 201
    [row] = sql_sync(
        module_database,
        "SELECT status, this_update, next_update FROM responses WHERE serial = $1",
        serial_key(cert.serial_number),
    )
    again = responder.record(cert)
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["status"] == "revoked"
    assert body["this_update"] == int(row["this_update"].timestamp())
    assert body["next_update"] == int(row["next_update"].timestamp())
    # revoked before it was ever recorded: new (201), but revoked
    early = p256_issuer.ca.issue_leaf("revoked-first.test")
    assert responder.revoke("p256", early.serial_number, "superseded").status_code == 201
    first = responder.record(early)
    assert first.status_code == 201 and first.json()["status"] == "revoked"
    answer = httpx.get(get_url(responder.url, build_request(early, p256_issuer.ca.ca_cert)))
    status = ocsp.load_der_ocsp_response(answer.content).certificate_status
    assert status == ocsp.OCSPCertStatus.REVOKED
    # a plain new certificate still reports good
    fresh = responder.record(p256_issuer.ca.issue_leaf("fresh.test"))
    assert fresh.status_code == 201 and fresh.json()["status"] == "good"


def test_cli_issue_refuses_lax_pem(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database, tmp_path
):
    """`issue` and the API read files the same strict way: a bundle with a block they
    would skip is refused whole, nothing of it recorded."""
    certs = [p256_issuer.ca.issue_leaf(f"lax{i}.test") for i in range(3)]
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    bundle = tmp_path / "lax.pem"
    bundle.write_bytes(
        pems[0] + pems[1].replace(b"CERTIFICATE", b"X509 CERTIFICATE") + pems[2] + pems[0][:90]
    )
    cmd = [str(VENV_BIN / "ocsp-responder"), "issue", "--config", str(responder.config_path)]
    result = subprocess.run([*cmd, str(bundle)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout
    assert "lax.pem: refused: bad PEM" in result.stderr and "X509 CERTIFICATE" in result.stderr
    rows = sql_sync(
        module_database,
        "SELECT 1 FROM certificates WHERE serial = ANY($1::bytea[])",
        [serial_key(c.serial_number) for c in certs],
    )
    assert rows == []
    # and it prints the state OCSP serves for a revoked serial
    good = tmp_path / "good.pem"
    good.write_bytes(pems[2])
    assert responder.revoke("p256", certs[2].serial_number).status_code == 201
    revoked = subprocess.run([*cmd, str(good)], capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    assert "recorded, OCSP answers revoked" in revoked.stdout
