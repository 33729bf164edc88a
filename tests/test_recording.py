"""Recording issuance through the admin API and the CLI: one code path, durable, idempotent."""

from __future__ import annotations

import base64
import datetime as dt
import re
import subprocess

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from responder.store import serial_key
from signer.demo_ca import DemoCA, create_ca, final_certificate, write_pem_cert
from signer.der import element_children, read_element
from signer.presign import tlv
from signer.recording import CertificateRejected, SerialError, parse_serial, split_certificates
from tests.stored_rows import issuer_with_responder
from tests.support import (
    VENV_BIN,
    build_request,
    check_response,
    get_url,
    sql_sync,
    write_config,
)


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
    # the final certificate (the precertificate's TBSCertificate without the poison, with
    # an SCT list) shares issuer and serial: already recorded
    final = final_certificate(p256_issuer.ca, pre)
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
    # a time after the issuer's notBefore (an earlier one is refused: test_revocation_input)
    when = p256_issuer.ca.ca_cert.not_valid_before_utc + dt.timedelta(seconds=5)
    ok = responder.revoke("p256", cert.serial_number, "superseded", revoked_at=when.isoformat())
    assert ok.status_code == 201, ok.text
    assert ok.json()["revoked_at"] == when.isoformat()
    assert responder.revoke("p256", cert.serial_number, "superseded").status_code == 200


# --- strict PEM, the stored state reported, RFC 5280 serials -----------------------------


def with_serial_content(ca: DemoCA, content: bytes) -> bytes:
    """A leaf signed by ``ca`` whose serial INTEGER content is ``content`` as given (zero,
    negative, over-long...): what cryptography's builder refuses to make."""
    template = ca.issue_leaf("odd-serial.test")
    der = template.public_bytes(serialization.Encoding.DER)
    tbs = template.tbs_certificate_bytes
    tbs_seq = read_element(tbs)
    version, _serial, *rest = element_children(tbs, tbs_seq)
    new_tbs = tlv(
        0x30,
        tbs[version.start : version.end] + tlv(0x02, content) + tbs[rest[0].start : tbs_seq.end],
    )
    cert_seq = read_element(der)
    _, sig_alg, _ = element_children(der, cert_seq)
    key = ca.ca_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    return tlv(0x30, new_tbs + der[sig_alg.start : sig_alg.end] + tlv(0x03, b"\x00" + signature))


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
    assert split_certificates(b"\xef\xbb\xbf" + good) == [a, b]  # a UTF-8 BOM, as openssl
    cases = {
        pem_of(a) + pem_of(b, "X509 CERTIFICATE") + pem_of(a): "'X509 CERTIFICATE' block",
        pem_of(a) + pem_of(b, "TRUSTED CERTIFICATE"): "'TRUSTED CERTIFICATE' block",
        pem_of(a) + pem_of(b)[:80]: "has no END line (truncated?)",
        pem_of(a).replace(b"-----END CERTIFICATE-----\n", b"") + pem_of(b): "has no END line (line",
        pem_of(a) + b"junk\n": "text outside a CERTIFICATE block",
        b"subject=CN = a.t\n" + pem_of(a): "line 1: text outside",
        b"\r\n" * 5 + b"  subject=CN = a.t\n" + pem_of(a): "line 6: text outside",
        pem_of(a) + b"x-----BEGIN CERTIFICATE-----\n": "malformed boundary",
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


def test_serial_rule() -> None:
    """RFC 5280 4.1.2.2: positive, at most 20 octets of DER INTEGER content (< 2^159)."""
    assert parse_serial("01") == 1
    assert parse_serial("7f" + "ff" * 19) == 2**159 - 1  # 20 octets
    assert parse_serial("00:7F:" + "FF:" * 18 + "ff") == 2**159 - 1
    for bad in ("0", "00", "80" + "00" * 19, "01" + "00" * 20, "ab" * 100, "1" * 16_000):
        with pytest.raises(SerialError, match="at most 20 octets") as info:
            parse_serial(bad)
        assert len(str(info.value)) < 400  # the message never carries the whole input
    with pytest.raises(SerialError, match="not hexadecimal"):
        parse_serial("-1")
    assert parse_serial(" 0x01ab\n") == parse_serial("01:AB") == 0x01AB
    # colons only between two-digit octets; only ASCII blanks around the serial
    for lax in ("f:f", "01:ab:", ":01ab", "01::ab", "1:ab", "\u00a001ab", "01ab\u2003"):
        with pytest.raises(SerialError, match="not hex"):
            parse_serial(lax)


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


def test_serials_outside_rfc5280_refused(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    """Revocations and certificates with a zero, negative or over-20-octet serial: 400
    naming the rule, nothing stored, and no log line carrying the serial whole."""
    huge = "1" * 16_000
    for serial in ("0", "01" + "00" * 20, "01" * 100, huge):
        resp = httpx.post(
            responder.admin_url + "/v1/revocations",
            json={"issuer": "p256", "serial": serial, "reason": "keyCompromise"},
            headers={"Authorization": f"Bearer {responder.token}"},
        )
        assert resp.status_code == 400, resp.text
        assert "at most 20 octets" in resp.json()["error"]
        assert len(resp.text) < 500
    ca = p256_issuer.ca
    contents = {
        "zero": b"\x00",
        "negative": b"\xff\x01",
        "21 octets": b"\x01" + b"\x11" * 20,
        "100 octets": b"\x01" * 100,
        "8000 octets": b"\x01" * 8000,
    }
    bodies = {name: with_serial_content(ca, content) for name, content in contents.items()}
    for name, der in bodies.items():
        resp = httpx.post(
            responder.admin_url + "/v1/certificates",
            content=der,
            headers={"Authorization": f"Bearer {responder.token}"},
        )
        assert resp.status_code == 400, (name, resp.text)
        assert "at most 20 octets" in resp.json()["error"], name
        assert len(resp.text) < 500, name
    batch = b"".join(
        [ca.issue_leaf("ok.test").public_bytes(serialization.Encoding.DER), *bodies.values()]
    )
    resp = responder.record_batch(batch)
    assert resp.status_code == 400, resp.text
    assert [r["index"] for r in resp.json()["rejected"]] == [1, 2, 3, 4, 5]
    ok_20 = with_serial_content(ca, b"\x7f" + b"\xee" * 19)  # the largest allowed length
    assert responder.record(x509.load_der_x509_certificate(ok_20), der=True).status_code == 201
    [row] = sql_sync(
        module_database,
        "SELECT count(*) AS n FROM certificates WHERE length(serial) > 20 OR get_byte(serial, 0) >= 128 OR serial = '\\x00'::bytea",
    )
    assert row["n"] == 0
    assert huge not in responder.log() and "01" * 100 not in responder.log()
    # the CLI applies the same rule, in one line
    cli = subprocess.run(
        [
            str(VENV_BIN / "ocsp-responder"),
            "revoke",
            "--config",
            str(responder.config_path),
            "--issuer",
            "p256",
            "--serial",
            "01" * 21,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1 and "at most 20 octets" in cli.stderr
    assert "Traceback" not in cli.stderr


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


def test_a_ca_certificate_sent_by_mistake_is_named_as_such(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    """The issuer's own certificate (or a root, or a whole chain file) was refused with
    "issuer ... is not configured here: add it to `issuers` first": advice to configure
    the root as an issuer. The 422 now says what the body is, and still records nothing."""
    ca = p256_issuer.ca
    own = responder.record(ca.ca_cert)
    assert own.status_code == 422, own.text
    assert "certificate of issuer p256 itself" in own.json()["error"]
    assert "add it to `issuers`" not in own.json()["error"]
    root = responder.record(ca.root_cert)
    assert root.status_code == 422, root.text
    assert "CA certificate (basicConstraints cA=TRUE)" in root.json()["error"]
    leaf = ca.issue_leaf("chain.file.test")
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca.ca_cert))
    batch = responder.record_batch(chain)
    assert batch.status_code == 422, batch.text
    [rejected] = batch.json()["rejected"]
    assert rejected["index"] == 1 and "issuer p256 itself" in rejected["error"]
    rows = sql_sync(
        module_database,
        "SELECT count(*) AS n FROM certificates WHERE serial = $1",
        serial_key(leaf.serial_number),
    )
    assert rows[0]["n"] == 0
    # a subscriber certificate of an unconfigured issuer keeps the usual advice
    other = create_ca("p256", "Other").issue_leaf("other.issuer.test")
    assert "add it to `issuers` first" in responder.record(other).json()["error"]


def test_cli_when_the_issuer_cannot_sign(module_database, tmp_path):  # type: ignore[no-untyped-def]
    """An issuer whose responder certificate expires within 8 h cannot sign (the API says
    503 "not recorded" / "not revoked"): `issue`, `import` and `revoke` printed a
    Python traceback. Now the same verdict as a database failure: NOT recorded, exit 3,
    one line, nothing written."""
    soon = issuer_with_responder(
        "soon", tmp_path, valid_from=dt.timedelta(days=1), valid_for=dt.timedelta(hours=28)
    )
    config = write_config(tmp_path, module_database, [soon]).config_path
    cert = soon.ca.issue_leaf("cannot.sign.test")
    pem = tmp_path / "cannot-sign.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    serial = format(cert.serial_number, "x")
    for command, words in [
        (["issue", str(pem)], f"{pem}: NOT recorded (do not publish): issuer soon"),
        (["import", "--no-journal", "--quiet", str(pem)], "the rest is NOT recorded"),
        (["revoke", "--issuer", "soon", "--serial", serial], "cannot sign, nothing written"),
    ]:
        result = subprocess.run(
            [str(VENV_BIN / "ocsp-responder"), command[0], "--config", str(config), *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 3, (command, result.stderr)
        assert "Traceback" not in result.stderr and words in result.stderr, result.stderr
        assert "too soon for a response valid 8h" in result.stderr
    for table in ("certificates", "revocations"):
        rows = sql_sync(
            module_database,
            f"SELECT count(*) AS n FROM {table} WHERE serial = $1",
            serial_key(cert.serial_number),
        )
        assert rows[0]["n"] == 0, table
