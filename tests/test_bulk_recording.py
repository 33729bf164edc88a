"""Bulk recording: the batch API (all or nothing) and `ocsp-responder import` (resumable)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

from responder.bulk_import import FileKey, ImportJournal
from responder.store import serial_key
from signer.demo_ca import LeafFactory, create_ca, write_pem_cert
from tests.support import (
    VENV_BIN,
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    sql_sync,
)


def stored(dsn: str, serials: list[int]) -> int:
    rows = sql_sync(
        dsn,
        "SELECT count(*) AS n FROM certificates c JOIN responses r USING (issuer_id, serial) "
        "WHERE c.serial = ANY($1::bytea[])",
        [serial_key(s) for s in serials],
    )
    return int(rows[0]["n"])


def test_batch_records_all_with_results_in_order(
    responder: ResponderProcess, p256_issuer: IssuerFiles, rsa_issuer: IssuerFiles
) -> None:
    certs = [p256_issuer.ca.issue_leaf(f"b{i}.test") for i in range(3)]
    certs.append(rsa_issuer.ca.issue_leaf("rsa.test"))
    certs.append(p256_issuer.ca.issue_leaf("pre.test", precertificate=True))
    der_body = b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)
    resp = responder.record_batch(der_body)  # concatenated DER
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["recorded"], body["created"], body["existing"]) == (5, 5, 0)
    assert [int(r["serial"], 16) for r in body["results"]] == [c.serial_number for c in certs]
    assert [r["issuer"] for r in body["results"]] == ["p256"] * 3 + ["rsa", "p256"]
    assert body["results"][4]["precertificate"] is True
    for cert, issuer in ((certs[0], p256_issuer), (certs[3], rsa_issuer)):
        der = build_request(cert, issuer.ca.ca_cert)
        answer = httpx.get(get_url(responder.url, der))
        check_response(answer.content, issuer=issuer, serial=cert.serial_number)
    # the same batch again, as PEM, plus one new: idempotent, per-item created flags
    extra = p256_issuer.ca.issue_leaf("b-new.test")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [*certs, extra])
    again = responder.record_batch(pem)
    assert again.status_code == 200
    assert [r["created"] for r in again.json()["results"]] == [False] * 5 + [True]


def test_batch_is_all_or_nothing(
    responder: ResponderProcess, p256_issuer: IssuerFiles, module_database: str
) -> None:
    good = [p256_issuer.ca.issue_leaf(f"aon{i}.test") for i in range(3)]
    foreign = create_ca("p256", "Foreign").issue_leaf("foreign.test")
    pem = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in [*good[:2], foreign, good[2]]
    )
    resp = responder.record_batch(pem)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert "nothing recorded" in body["error"]
    assert [(r["index"], r["status"]) for r in body["rejected"]] == [(2, 422)]
    assert stored(module_database, [c.serial_number for c in good]) == 0
    # garbage, empty, truncated DER: 400, nothing recorded
    assert responder.record_batch(b"").status_code == 400
    assert responder.record_batch(b"junk").status_code == 400
    der = good[0].public_bytes(serialization.Encoding.DER)
    truncated = responder.record_batch(der + der[:40])
    assert truncated.status_code == 400 and "not a PEM or DER" in truncated.json()["error"]
    assert stored(module_database, [c.serial_number for c in good]) == 0


def test_batch_requires_token(responder: ResponderProcess, p256_issuer: IssuerFiles) -> None:
    cert = p256_issuer.ca.issue_leaf("tok.test")
    resp = httpx.post(
        responder.admin_url + "/v1/certificates:batch",
        content=cert.public_bytes(serialization.Encoding.PEM),
    )
    assert resp.status_code == 401


def run_import(responder: ResponderProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(VENV_BIN / "ocsp-responder"),
            "import",
            "--config",
            str(responder.config_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_files_and_directories_resumable(
    responder: ResponderProcess,
    p256_issuer: IssuerFiles,
    module_database: str,
    tmp_path: Path,
) -> None:
    factory = LeafFactory(p256_issuer.ca)
    bundle_certs = [factory.certificate() for _ in range(250)]
    write_pem_cert(tmp_path / "bundle.pem", *bundle_certs)
    tree = tmp_path / "tree" / "deeper"
    tree.mkdir(parents=True)
    der_certs = [factory.certificate() for _ in range(3)]
    for i, cert in enumerate(der_certs):
        (tree / f"c{i}.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    (tree / "notes.txt").write_text("not a certificate, not picked up from a directory")
    journal = tmp_path / "journal.jsonl"
    [started] = sql_sync(module_database, "SELECT now() AS t")
    first = run_import(
        responder,
        "--batch-size",
        "100",
        "--journal",
        str(journal),
        str(tmp_path / "bundle.pem"),
        str(tmp_path / "tree"),
    )
    assert first.returncode == 0, first.stderr
    assert "253 certificates from 4 files: 253 new" in first.stdout
    assert "253/253" in first.stderr  # the progress bar's last line
    # the import refreshed the statistics the serving lookups plan from (the test role
    # owns the tables)
    [analyzed] = sql_sync(
        module_database,
        "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'responses'",
    )
    assert analyzed["last_analyze"] is not None and analyzed["last_analyze"] > started["t"]
    everything = [c.serial_number for c in bundle_certs + der_certs]
    assert stored(module_database, everything) == 253
    # again: every file is in the journal as complete, nothing is re-signed
    second = run_import(responder, "--journal", str(journal), str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "0 new, 0 already recorded" in second.stdout and "253 skipped" in second.stdout
    # an interrupted run: the journal says 100 of the bundle were done; only the rest is read
    lines = journal.read_text().splitlines()
    bundle_lines = [line for line in lines if "bundle.pem" in line]
    journal.write_text(bundle_lines[0] + "\n")  # {"done": 100, "complete": false}
    resumed = run_import(responder, "--journal", str(journal), str(tmp_path / "bundle.pem"))
    assert resumed.returncode == 0, resumed.stderr
    assert "150 already recorded" in resumed.stdout and "100 skipped" in resumed.stdout
    # --restart ignores the journal; idempotent all the same
    restarted = run_import(
        responder, "--journal", str(journal), "--restart", str(tmp_path / "bundle.pem")
    )
    assert "0 new, 250 already recorded" in restarted.stdout


def test_import_reports_refusals_and_continues(
    responder: ResponderProcess, p256_issuer: IssuerFiles, module_database: str, tmp_path: Path
) -> None:
    good = [p256_issuer.ca.issue_leaf(f"imp{i}.test") for i in range(2)]
    foreign = create_ca("p256", "Elsewhere").issue_leaf("elsewhere.test")
    write_pem_cert(tmp_path / "mixed.pem", good[0], foreign, good[1])
    (tmp_path / "junk.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    journal = tmp_path / "journal.jsonl"
    inputs = (str(tmp_path / "mixed.pem"), str(tmp_path / "junk.pem"))
    result = run_import(responder, "--journal", str(journal), "--quiet", *inputs)
    assert result.returncode == 1
    assert "2 new" in result.stdout and "2 refused" in result.stdout
    assert (
        "not configured" in result.stderr and "junk.pem: certificate #1: refused" in result.stderr
    )
    # the refusal names the file and the certificate's place in it
    assert "mixed.pem: certificate #2 (serial " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert stored(module_database, [c.serial_number for c in good]) == 2
    # a rerun does not skip what was refused as if it were done (it said "3 skipped",
    # exit 0): the refused certificates are tried again, and refused again here
    again = run_import(responder, "--journal", str(journal), "--quiet", *inputs)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "2 refused" in again.stdout and "not configured" in again.stderr
    missing = run_import(responder, str(tmp_path / "nope"))
    assert missing.returncode == 1 and "nope: no such file or directory" in missing.stderr


def test_batch_refuses_blocks_a_lax_reader_would_skip(
    responder: ResponderProcess, p256_issuer: IssuerFiles, module_database: str
) -> None:
    """A block labelled otherwise, or cut short, was dropped while the rest was answered
    200 "recorded": now the whole batch is refused (400) and nothing is recorded."""
    certs = [p256_issuer.ca.issue_leaf(f"skip{i}.test") for i in range(3)]
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    serials = [c.serial_number for c in certs]
    for label in (b"TRUSTED CERTIFICATE", b"X509 CERTIFICATE"):
        body = pems[0] + pems[1].replace(b"CERTIFICATE", label) + pems[2]
        resp = responder.record_batch(body)
        assert resp.status_code == 400, resp.text
        assert label.decode() in resp.json()["error"]
    no_end = pems[0] + pems[1] + pems[2].replace(b"-----END CERTIFICATE-----\n", b"")
    resp = responder.record_batch(no_end)
    assert resp.status_code == 400 and "no END line" in resp.json()["error"]
    assert stored(module_database, serials) == 0
    # the batch answer reports what is stored: a revoked serial is not "good"
    assert responder.record_batch(b"".join(pems)).status_code == 200
    assert responder.revoke("p256", certs[1].serial_number).status_code == 201
    again = responder.record_batch(b"".join(pems))
    assert [r["status"] for r in again.json()["results"]] == ["good", "revoked", "good"]


def test_import_refuses_a_file_with_skipped_blocks(
    responder: ResponderProcess, p256_issuer: IssuerFiles, module_database: str, tmp_path: Path
) -> None:
    """`import` reads files as the API does: a bundle with an `X509 CERTIFICATE` block and
    a truncated one is refused (exit 1), not "imported 2 ... 0 refused" (exit 0)."""
    certs = [p256_issuer.ca.issue_leaf(f"lax-imp{i}.test") for i in range(4)]
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    (tmp_path / "lax.pem").write_bytes(
        pems[0] + pems[1].replace(b"CERTIFICATE", b"X509 CERTIFICATE") + pems[2] + pems[0][:80]
    )
    write_pem_cert(tmp_path / "fine.pem", certs[3])
    result = run_import(
        responder, "--no-journal", "--quiet", str(tmp_path / "lax.pem"), str(tmp_path / "fine.pem")
    )
    assert result.returncode == 1, result.stdout
    assert "lax.pem: refused: bad PEM" in result.stderr, result.stderr
    assert "1 new" in result.stdout and "1 refused" in result.stdout
    assert stored(module_database, [c.serial_number for c in certs[:3]]) == 0
    assert stored(module_database, [certs[3].serial_number]) == 1


def test_import_journal_after_a_torn_last_line(tmp_path: Path) -> None:
    """An import killed while writing its journal leaves a line without its newline; the
    next run's first entry was appended to it, unparseable, so that progress was lost (a
    file journaled complete was imported again by the run after)."""
    journal_path = tmp_path / "journal.jsonl"
    journal_path.write_bytes(b'{"path": "/x.pem", "size": 1, "mtime_ns": 2, "do')
    key = FileKey("/y.pem", 10, 20)
    journal = ImportJournal(journal_path)
    journal.mark(key, 5, True)
    journal.close()
    assert ImportJournal(journal_path).done(key) == (5, True)


def test_batch_of_many_tiny_elements_is_cut_short(
    responder: ResponderProcess, p256_issuer: IssuerFiles, module_database: str
) -> None:
    """A 16 MiB batch of 2-byte DER SEQUENCEs was split whole (8 million elements) before
    any was parsed or counted: about 14 s of CPU in the event loop that answers OCSP too,
    and some 500 MB, for an answer of 400. The count limit now applies while splitting:
    413 at element 10,001, for DER and PEM alike, and nothing is recorded."""
    cert = p256_issuer.ca.issue_leaf("tiny.elements.test")
    der = cert.public_bytes(serialization.Encoding.DER)
    junk_der = der + b"\x30\x00" * ((16 * 1024 * 1024 - len(der)) // 2)
    tiny_pem = b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"
    junk_pem = cert.public_bytes(serialization.Encoding.PEM) + tiny_pem * 10_000
    for body in (junk_der, junk_pem):
        resp = responder.record_batch(body)
        assert resp.status_code == 413, resp.text[:300]
        assert "more than 10000 certificates" in resp.json()["error"]
    assert stored(module_database, [cert.serial_number]) == 0
    # exactly at the limit is still read (and refused for what the elements are)
    resp = responder.record_batch(tiny_pem * 10_000)
    assert resp.status_code == 400 and "not a certificate" in resp.json()["error"], resp.text
