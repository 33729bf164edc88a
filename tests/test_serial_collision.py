"""Serial collisions: two different certificates of one issuer with one serial.

A CA must never issue them (BR 7.1, RFC 5280 4.1.2.2); recording the second is refused
(409, nothing written) instead of being answered "already recorded" while OCSP keeps
serving the first one's status. Only a precertificate and its final certificate share a
serial (RFC 6962 3.1): their fingerprints (the TBSCertificate without the CT poison and
SCT list extensions) are equal.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from responder.store import (
    CertificateRecord,
    PresignedStore,
    SerialCollision,
    serial_key,
)
from signer.demo_ca import (
    DemoCA,
    create_ca,
    final_certificate,
    random_serial,
    sct_list_extension_value,
    write_pem_cert,
)
from signer.der import (
    DERError,
    element_children,
    encode_tlv,
    read_element,
    tbs_without_ct_extensions,
)
from signer.issuers import issuer_from_certificate, make_responder
from signer.presign import PresignedSigner
from signer.recording import CertificateRejected, format_serial, tbs_fingerprint
from signer.response_builder import SignedResponse, ValidityPolicy
from tests.support import VENV_BIN, IssuerFiles, build_request, get_url, sql_sync

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


# --- the fingerprint --------------------------------------------------------------------


def test_fingerprint_pairs_a_precertificate_with_its_final_certificate() -> None:
    ca = create_ca("p256", "Fingerprint")
    pre = ca.issue_leaf("pair.test", precertificate=True)
    finals = [
        final_certificate(ca, pre),  # SCT list last
        final_certificate(ca, pre, sct_position=0),  # SCT list first
        final_certificate(ca, pre, sct_list=sct_list_extension_value(3)),  # other SCTs
        final_certificate(ca, pre, sct_list=b""),  # no SCT list (logged after issuance)
    ]
    for final in finals:
        final.verify_directly_issued_by(ca.ca_cert)
        assert final.serial_number == pre.serial_number
        assert tbs_fingerprint(final) == tbs_fingerprint(pre)
    # a certificate without CT extensions is its own normal form
    plain = finals[3].tbs_certificate_bytes
    assert tbs_without_ct_extensions(plain) == plain
    # one serial, anything else different: another key, another name, another validity
    others = [
        ca.issue_leaf("pair.test", serial=pre.serial_number),
        ca.issue_leaf("pair.test", serial=pre.serial_number, precertificate=True),
        ca.issue_leaf("other.test", serial=pre.serial_number),
        ca.issue_leaf("pair.test", serial=pre.serial_number, lifetime=dt.timedelta(days=30)),
    ]
    prints = {tbs_fingerprint(c) for c in others} | {tbs_fingerprint(pre)}
    assert len(prints) == len(others) + 1


def test_fingerprint_keeps_extension_order_and_is_strict() -> None:
    ca = create_ca("p256", "Strictness")
    pre = ca.issue_leaf("order.test", precertificate=True)
    tbs = pre.tbs_certificate_bytes
    # swapping two extensions (not CT ones) makes another certificate
    top = read_element(tbs)
    fields = element_children(tbs, top)
    exts = element_children(tbs, element_children(tbs, fields[-1])[0])
    raw = [tbs[e.start : e.end] for e in exts]
    swapped = encode_tlv(
        0x30,
        tbs[top.value_start : fields[-1].start]
        + encode_tlv(0xA3, encode_tlv(0x30, b"".join([raw[1], raw[0], *raw[2:]]))),
    )
    assert len(swapped) == len(tbs) and swapped != tbs
    assert tbs_without_ct_extensions(tbs) != tbs_without_ct_extensions(swapped)
    for bad in (
        tbs + b"\x00",  # trailing bytes
        tbs[:-1],  # truncated
        b"\x30\x81\x05" + tbs[2:7],  # non-minimal length
        encode_tlv(0x30, b"\x02\x01\x01"),  # not a TBSCertificate
    ):
        with pytest.raises(DERError):
            tbs_without_ct_extensions(bad)


# --- through the admin API, against PostgreSQL -------------------------------------------


def fingerprint_row(dsn: str, cert: x509.Certificate) -> list[object]:
    return [
        tuple(row)
        for row in sql_sync(
            dsn,
            "SELECT c.kinds, c.tbs_sha256, c.not_after, r.der FROM certificates c "
            "JOIN responses r USING (issuer_id, serial) WHERE serial = $1",
            serial_key(cert.serial_number),
        )
    ]


def ocsp_status(responder, issuer: IssuerFiles, cert: x509.Certificate) -> ocsp.OCSPCertStatus:  # type: ignore[no-untyped-def]
    answer = httpx.get(get_url(responder.url, build_request(cert, issuer.ca.ca_cert)))
    return ocsp.load_der_ocsp_response(answer.content).certificate_status


def failures(responder) -> float:  # type: ignore[no-untyped-def]
    text = httpx.get(responder.admin_url + "/metrics").text
    for line in text.splitlines():
        if line.startswith('ocsp_recording_failures_total{reason="serial_collision"}'):
            return float(line.split()[-1])
    return 0.0


def test_collision_is_refused_and_nothing_written(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    ca = p256_issuer.ca
    a = ca.issue_leaf("a.collide.test")
    assert responder.record(a).status_code == 201
    before = fingerprint_row(module_database, a)
    assert before[0][1] == tbs_fingerprint(a)  # stored with the row
    assert responder.revoke("p256", a.serial_number, "superseded").status_code == 201
    revoked = fingerprint_row(module_database, a)
    counted = failures(responder)
    # B: same issuer and serial, another subject, key and a longer validity
    b = ca.issue_leaf("b.collide.test", serial=a.serial_number, lifetime=dt.timedelta(days=200))
    for der in (False, True):
        resp = responder.record(b, der=der)
        assert resp.status_code == 409, resp.text
        body = resp.json()
        assert body["recorded"] is False and body["issuer"] == "p256"
        assert int(body["serial"], 16) == a.serial_number
        assert "another certificate" in body["error"] and "serial collision" in body["error"]
    assert fingerprint_row(module_database, a) == revoked  # nothing written, B's notAfter too
    assert ocsp_status(responder, p256_issuer, a) is ocsp.OCSPCertStatus.REVOKED
    assert failures(responder) == counted + 2
    [line, *_] = [
        x
        for x in responder.log().splitlines()
        if format_serial(a.serial_number) in x and "ERROR" in x
    ]
    assert "serial collision" in line and "issuer=p256" in line and len(line) < 600
    # a precertificate of B collides as well (its fingerprint is B's, not A's)
    b_pre = ca.issue_leaf("b.collide.test", serial=a.serial_number, precertificate=True)
    assert responder.record(b_pre).status_code == 409
    assert before[0][1] == fingerprint_row(module_database, a)[0][1]


def test_precertificate_and_final_in_either_order_and_repeats(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    ca = p256_issuer.ca
    for pre_first in (True, False):
        pre = ca.issue_leaf(f"order-{pre_first}.test", precertificate=True)
        final = final_certificate(ca, pre)
        first, second = (pre, final) if pre_first else (final, pre)
        assert responder.record(first).status_code == 201
        again = responder.record(second)
        assert again.status_code == 200, again.text
        assert again.json()["precertificate"] is (second is pre)
        assert responder.record(first).status_code == 200  # the same one twice
        assert responder.record(second, der=True).status_code == 200
        [row] = fingerprint_row(module_database, pre)
        assert row[0] == 3 and row[1] == tbs_fingerprint(pre) == tbs_fingerprint(final)
        assert ocsp_status(responder, p256_issuer, final) is ocsp.OCSPCertStatus.GOOD


def test_row_from_before_the_fingerprint_adopts_the_next_one(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    """A row recorded before migration 0006 has no fingerprint: the next recording of its
    serial gives it one (not a collision, nothing to compare), and from then on it holds."""
    ca = p256_issuer.ca
    legacy = ca.issue_leaf("legacy.test")
    assert responder.record(legacy).status_code == 201
    sql_sync(
        module_database,
        "UPDATE certificates SET tbs_sha256 = NULL WHERE serial = $1",
        serial_key(legacy.serial_number),
    )
    assert responder.record(legacy).status_code == 200
    assert fingerprint_row(module_database, legacy)[0][1] == tbs_fingerprint(legacy)
    other = ca.issue_leaf("legacy-other.test", serial=legacy.serial_number)
    assert responder.record(other).status_code == 409
    # a legacy row takes its first fingerprint in a batch as well, with another new serial
    sql_sync(
        module_database,
        "UPDATE certificates SET tbs_sha256 = NULL WHERE serial = $1",
        serial_key(legacy.serial_number),
    )
    fresh = ca.issue_leaf("legacy-fresh.test")
    resp = responder.record_batch(legacy.public_bytes(PEM) + fresh.public_bytes(PEM))
    assert resp.status_code == 200, resp.text
    assert fingerprint_row(module_database, legacy)[0][1] == tbs_fingerprint(legacy)
    assert fingerprint_row(module_database, fresh)[0][1] == tbs_fingerprint(fresh)


def test_batch_with_one_collision_is_refused_whole(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    ca = p256_issuer.ca
    held = ca.issue_leaf("held.batch.test")
    assert responder.record(held).status_code == 201
    new = [ca.issue_leaf(f"new{i}.batch.test") for i in range(2)]
    collider = ca.issue_leaf("collider.batch.test", serial=held.serial_number)
    body = new[0].public_bytes(PEM) + collider.public_bytes(PEM) + new[1].public_bytes(PEM)
    resp = responder.record_batch(body)
    assert resp.status_code == 409, resp.text
    rejected = resp.json()["rejected"]
    assert [(r["index"], r["status"]) for r in rejected] == [(1, 409)]
    assert "serial collision" in rejected[0]["error"]
    assert "nothing recorded" in resp.json()["error"]
    for cert in new:  # the others were not written either
        assert fingerprint_row(module_database, cert) == []
    # two different certificates with one new serial in one call: the second collides
    twin_serial = random_serial()
    twins = [ca.issue_leaf(f"twin{i}.batch.test", serial=twin_serial) for i in range(2)]
    resp = responder.record_batch(b"".join(c.public_bytes(DER) for c in [new[0], *twins]))
    assert resp.status_code == 409, resp.text
    assert [r["index"] for r in resp.json()["rejected"]] == [2]
    assert fingerprint_row(module_database, twins[0]) == []
    assert fingerprint_row(module_database, new[0]) == []
    # a precertificate with its final certificate in one call is fine
    pre = ca.issue_leaf("pair.batch.test", precertificate=True)
    resp = responder.record_batch(
        b"".join(c.public_bytes(PEM) for c in (pre, final_certificate(ca, pre), *new))
    )
    assert resp.status_code == 200, resp.text
    assert [r["created"] for r in resp.json()["results"]] == [True, False, True, True]


def test_cli_issue_and_import_refuse_a_collision(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database, tmp_path: Path
):
    ca = p256_issuer.ca
    held = ca.issue_leaf("held.cli.test")
    assert responder.record(held).status_code == 201
    collider = ca.issue_leaf("collider.cli.test", serial=held.serial_number)
    pem = tmp_path / "collider.pem"
    write_pem_cert(pem, collider)
    cfg = ["--config", str(responder.config_path)]
    issue = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "issue", *cfg, str(pem)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issue.returncode == 1, issue.stdout + issue.stderr
    [line] = [x for x in issue.stderr.splitlines() if "collider.pem" in x]
    assert "collider.pem: refused: serial collision: issuer p256 serial" in line
    assert "Traceback" not in issue.stderr
    # import: the colliding certificate is refused, the rest of its batch is recorded
    others = [ca.issue_leaf(f"import{i}.cli.test") for i in range(3)]
    bundle = tmp_path / "in" / "bundle.pem"
    bundle.parent.mkdir()
    write_pem_cert(bundle, others[0], collider, others[1], others[2])
    journal = ["--journal", str(tmp_path / "journal.jsonl")]
    imported = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "import", *journal, "--quiet", *cfg, str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 1, imported.stdout + imported.stderr
    refused = [x for x in imported.stderr.splitlines() if "refused" in x]
    assert len(refused) == 1 and "serial collision" in refused[0], imported.stderr
    assert refused[0].startswith(f"{bundle.resolve()}: certificate #2 (serial "), refused[0]
    # not journaled as done: a rerun reports it again instead of "skipped"
    rerun = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "import", *journal, "--quiet", *cfg, str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rerun.returncode == 1 and "1 refused" in rerun.stdout, rerun.stdout + rerun.stderr
    assert "3 new, 0 already recorded, 1 refused" in imported.stdout
    for cert in others:
        assert fingerprint_row(module_database, cert)[0][1] == tbs_fingerprint(cert)
    assert fingerprint_row(module_database, held)[0][1] == tbs_fingerprint(held)


# --- concurrency, at the store ----------------------------------------------------------


async def test_concurrent_colliding_recordings_never_both_succeed(
    module_database: str, demo_ca: DemoCA
) -> None:
    """Two calls at once, each recording a different certificate with the same new
    serial (and a batch-mate), on their own connections: exactly one succeeds, the other
    gets SerialCollision and leaves nothing (not even its batch-mate)."""
    store = await PresignedStore.connect(module_database, min_size=4, max_size=8)
    try:
        assert store.tbs_fingerprints
        issuer = issuer_from_certificate("concurrent", demo_ca.ca_cert)
        issuer.responders.append(
            make_responder(issuer, demo_ca.responder_cert, demo_ca.responder_key, delegated=True)
        )
        await store.register_issuers([issuer])
        presigner = PresignedSigner(ValidityPolicy())
        not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=90)

        def item(serial: int, fingerprint: bytes) -> tuple[CertificateRecord, SignedResponse]:
            record = CertificateRecord(issuer.db_id, serial, not_after, False, fingerprint)
            return record, presigner.sign_good(issuer, serial)

        for round_ in range(12):
            serial, mates = random_serial(), [random_serial(), random_serial()]
            results = await asyncio.gather(
                *(
                    store.record_certificates(
                        [item(mates[side], b"\x09" * 32), item(serial, bytes([side]) * 32)]
                    )
                    for side in (0, 1)
                ),
                return_exceptions=True,
            )
            ok = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, SerialCollision)]
            assert len(ok) == 1 and len(refused) == 1, (round_, results)
            assert [c.index for c in refused[0].collisions] == [1]
            winner = ok[0]
            rows = await store.pool.fetch(
                "SELECT serial, tbs_sha256 FROM certificates WHERE serial = ANY($1::bytea[])",
                [serial_key(s) for s in (serial, *mates)],
            )
            assert {bytes(r["serial"]): bytes(r["tbs_sha256"]) for r in rows} == {
                serial_key(serial): bytes([winner]) * 32,
                serial_key(mates[winner]): b"\x09" * 32,
            }
    finally:
        await store.close()


def test_unparsable_tbs_is_refused() -> None:
    """A certificate whose TBSCertificate does not walk strictly is refused (400) rather
    than recorded without a fingerprint."""

    class NotWalkable:
        tbs_certificate_bytes = b"\x30\x03\x02\x01"

    with pytest.raises(CertificateRejected, match="cannot read the TBSCertificate") as info:
        tbs_fingerprint(NotWalkable())  # type: ignore[arg-type]
    assert info.value.status == 400
