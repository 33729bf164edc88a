"""Revocation input through the admin API and the CLI: what is refused (400 / one-line CLI
error, nothing written), and how a repeated revocation is answered (only a later
keyCompromise changes what is stored, MRSP 6.1.1; anything else says it was not applied).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from responder.store import serial_key
from signer.demo_ca import random_serial
from signer.recording import format_serial
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


def post(responder: ResponderProcess, payload: object) -> httpx.Response:
    return httpx.post(
        responder.admin_url + "/v1/revocations",
        json=payload,
        headers={"Authorization": f"Bearer {responder.token}"},
        timeout=30,
    )


def stored_revocation(dsn: str, serial: int) -> tuple[dt.datetime, int] | None:
    rows = sql_sync(
        dsn, "SELECT revoked_at, reason FROM revocations WHERE serial = $1", serial_key(serial)
    )
    return (rows[0]["revoked_at"], rows[0]["reason"]) if rows else None


def iso(moment: dt.datetime) -> str:
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def cli_revoke(
    responder: ResponderProcess, serial: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(VENV_BIN / "ocsp-responder"),
            "revoke",
            "--config",
            str(responder.config_path),
            "--issuer",
            "p256",
            "--serial",
            format(serial, "x"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "reason",
    [
        ["keyCompromise"],
        {},
        True,
        False,
        "\u0661",
        "\u00b2",
        "1 ",
        "KeyCompromise",
        1.0,
        None,
        2,
        6,
    ],
)
def test_reason_must_be_a_br_name_or_integer_code(responder, module_database, reason):  # type: ignore[no-untyped-def]
    """Lists and objects gave 500 TypeError, booleans were read as codes 1/0, Unicode
    digits (U+0661) as codes: now each is a 400 listing the allowed reasons, nothing stored."""
    serial = random_serial()
    response = post(responder, {"issuer": "p256", "serial": format(serial, "x"), "reason": reason})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "keyCompromise (1)" in error and "superseded (4)" in error
    assert "invalid literal" not in error
    assert stored_revocation(module_database, serial) is None


@pytest.mark.parametrize(
    ("reason", "code"), [(4, 4), ("4", 4), ("superseded", 4), ("keyCompromise", 1), (0, 0)]
)
def test_reason_names_and_codes_accepted(responder, module_database, reason, code):  # type: ignore[no-untyped-def]
    serial = random_serial()
    response = post(responder, {"issuer": "p256", "serial": format(serial, "x"), "reason": reason})
    assert response.status_code == 201, response.text
    stored = stored_revocation(module_database, serial)
    assert stored is not None and stored[1] == code


def test_duplicate_keys_are_refused(responder, module_database):  # type: ignore[no-untyped-def]
    """A key given twice was read as its last value (revoked superseded here)."""
    serial = random_serial()
    body = (
        f'{{"issuer": "p256", "serial": "{serial:x}", "reason": "keyCompromise", '
        '"reason": "superseded"}'
    )
    response = httpx.post(
        responder.admin_url + "/v1/revocations",
        content=body,
        headers={"Authorization": f"Bearer {responder.token}"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert "'reason' appears twice" in response.json()["error"]
    assert stored_revocation(module_database, serial) is None


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"issuer": "p256", "serial": 12345, "reason": "superseded"}, "serial must be a string"),
        ({"issuer": "p256", "serial": None}, "serial must be a string"),
        ({"issuer": "p256"}, "serial must be a string"),
        ({"issuer": "p256", "serial": ["0123"]}, "serial must be a string"),
        ({"issuer": 1, "serial": "0123"}, "issuer must be a string"),
        ({"issuer": ["p256"], "serial": "0123"}, "issuer must be a string"),
        ({"issuer": "p256", "serial": "0123", "revoked_at": 1767225600}, "ISO 8601 string"),
        ({"issuer": "p256", "serial": "0123", "revokedAt": "x"}, "unknown field(s) revokedAt"),
    ],
)
def test_fields_must_have_their_json_type(responder, module_database, payload, words):  # type: ignore[no-untyped-def]
    """A JSON number serial was str()-ed and read as hex (12345 revoked 0x012345)."""
    response = post(responder, payload)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]
    for serial in (0x12345, 12345, 0x123):
        assert stored_revocation(module_database, serial) is None


def test_revocation_time_range(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    """Year 1 with a positive offset gave 500 OverflowError; year 1 and 1900 UTC were
    signed. Refused now: unrepresentable, in the future, before the issuer existed."""
    cert = p256_issuer.ca.issue_leaf("time.range.test")
    assert responder.record(cert).status_code == 201
    issuer_not_before = p256_issuer.ca.ca_cert.not_valid_before_utc
    for revoked_at, words in [
        ("0001-01-01T00:00:00+01:00", "out of range"),
        ("9999-12-31T23:59:59-01:00", "out of range"),
        ("0001-01-01T00:00:00Z", "notBefore of issuer p256"),
        ("1900-01-01T00:00:00Z", "notBefore of issuer p256"),
        (iso(issuer_not_before - dt.timedelta(seconds=1)), "notBefore of issuer p256"),
        ("2099-01-01T00:00:00Z", "in the future"),
        ("2026-01-02T03:04:05", "RFC 3339 date-time with a zone"),
        ("yesterday", "RFC 3339 date-time with a zone"),
    ]:
        response = responder.revoke("p256", cert.serial_number, "superseded", revoked_at=revoked_at)
        assert response.status_code == 400, (revoked_at, response.text)
        assert words in response.json()["error"], (revoked_at, response.text)
    assert stored_revocation(module_database, cert.serial_number) is None
    # the bound itself is accepted, in UTC whatever offset was sent
    at_bound = issuer_not_before.astimezone(dt.timezone(dt.timedelta(hours=2)))
    ok = responder.revoke("p256", cert.serial_number, "superseded", revoked_at=at_bound.isoformat())
    assert ok.status_code == 201, ok.text
    assert ok.json()["revoked_at"] == issuer_not_before.isoformat()
    assert stored_revocation(module_database, cert.serial_number) == (issuer_not_before, 4)


def test_cli_time_errors_are_one_line(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    """The CLI printed tracebacks (ValueError for a future time, OverflowError for year 1
    at +01:00): now one line, exit 1, nothing stored."""
    serial = random_serial()
    for when, words in [
        ("2099-01-01T00:00:00Z", "in the future"),
        ("0001-01-01T00:00:00+01:00", "out of range"),
        ("1900-01-01T00:00:00Z", "notBefore of issuer p256"),
    ]:
        result = cli_revoke(responder, serial, "--reason", "superseded", "--time", when)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert errors == [errors[0]] and words in errors[0], result.stderr
    for reason in ("\u0661", "true"):
        result = cli_revoke(responder, serial, "--reason", reason)
        assert result.returncode == 1 and "use one of" in result.stderr, result.stderr
    assert stored_revocation(module_database, serial) is None


@pytest.fixture(scope="module")
def instance_b(
    module_database: str, p256_issuer: IssuerFiles, workdir: Path
) -> Iterator[ResponderProcess]:
    """A second responder on the same database: it learns of changes only by NOTIFY."""
    b = write_config(workdir / "b", module_database, [p256_issuer]).start()
    try:
        yield b
    finally:
        b.stop()


def answered_reason(
    instance: ResponderProcess, der: bytes, issuer: IssuerFiles, serial: int
) -> x509.ReasonFlags | None:
    body = httpx.get(get_url(instance.url, der), timeout=10).content
    checked = check_response(body, issuer=issuer, serial=serial, expect="revoked", openssl=False)
    return checked.response.revocation_reason


def test_later_key_compromise_replaces_the_reason(
    responder, instance_b, p256_issuer, module_database
):  # type: ignore[no-untyped-def]
    """superseded then keyCompromise answered 200 "superseded" and changed nothing: now the
    reason becomes keyCompromise, the original time stays, both instances answer it."""
    cert = p256_issuer.ca.issue_leaf("raise.reason.test")
    assert responder.record(cert).status_code == 201
    first_time = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    first = responder.revoke("p256", cert.serial_number, "superseded", revoked_at=iso(first_time))
    assert first.status_code == 201, first.text
    der = build_request(cert, p256_issuer.ca.ca_cert)
    for instance in (responder, instance_b):  # cache the superseded answer on both
        for _ in range(2):
            assert answered_reason(instance, der, p256_issuer, cert.serial_number) == (
                x509.ReasonFlags.superseded
            )
    # a later time for keyCompromise keeps the original (earliest) revocation time
    raised = responder.revoke(
        "p256",
        cert.serial_number,
        "keyCompromise",
        revoked_at=iso(first_time + dt.timedelta(minutes=30)),
    )
    assert raised.status_code == 200, raised.text
    body = raised.json()
    assert (
        body["reason"] == "keyCompromise" and body["updated"] is True and body["created"] is False
    )
    assert body["revoked_at"] == first_time.isoformat()
    assert stored_revocation(module_database, cert.serial_number) == (first_time, 1)
    stored_der = sql_sync(
        module_database,
        "SELECT der FROM responses WHERE serial = $1",
        serial_key(cert.serial_number),
    )[0]["der"]
    check = check_response(
        stored_der, issuer=p256_issuer, serial=cert.serial_number, expect="revoked"
    )
    assert check.response.revocation_reason == x509.ReasonFlags.key_compromise
    assert check.response.revocation_time_utc == first_time
    # both instances drop their cached superseded answer (B through the NOTIFY)
    for instance in (responder, instance_b):
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        while answered_reason(instance, der, p256_issuer, cert.serial_number) != (
            x509.ReasonFlags.key_compromise
        ):
            assert dt.datetime.now(dt.UTC) < deadline, "cached superseded answer still served"
    # an earlier keyCompromise time moves the revocation time back (BR 7.2.2 note)
    earlier = first_time - dt.timedelta(hours=2)
    moved = responder.revoke("p256", cert.serial_number, "keyCompromise", revoked_at=iso(earlier))
    assert moved.status_code == 200 and moved.json()["updated"] is True, moved.text
    assert stored_revocation(module_database, cert.serial_number) == (earlier, 1)
    # the same keyCompromise again: nothing to change, said so
    again = responder.revoke("p256", cert.serial_number, "keyCompromise")
    assert again.status_code == 200, again.text
    assert again.json()["updated"] is False and again.json()["created"] is False
    assert again.json()["revoked_at"] == earlier.isoformat()


def test_other_changes_are_refused_and_said_so(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    """Lowering keyCompromise, swapping reasons or moving the time: 409 naming what stands,
    nothing written; an identical repeat stays 200."""
    cert = p256_issuer.ca.issue_leaf("refused.change.test")
    assert responder.record(cert).status_code == 201
    when = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=10)
    assert (
        responder.revoke("p256", cert.serial_number, "superseded", revoked_at=iso(when)).status_code
        == 201
    )
    stored_der = sql_sync(
        module_database,
        "SELECT der FROM responses WHERE serial = $1",
        serial_key(cert.serial_number),
    )[0]["der"]
    for reason, extra in [
        ("cessationOfOperation", {}),
        ("unspecified", {}),
        ("superseded", {"revoked_at": iso(when - dt.timedelta(minutes=1))}),
    ]:
        refused = responder.revoke("p256", cert.serial_number, reason, **extra)
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["applied"] is False and "not applied" in body["error"]
        assert body["reason"] == "superseded" and body["revoked_at"] == when.isoformat()
    same = responder.revoke("p256", cert.serial_number, "superseded", revoked_at=iso(when))
    assert same.status_code == 200 and same.json()["updated"] is False, same.text
    assert stored_revocation(module_database, cert.serial_number) == (when, 4)
    assert (
        sql_sync(
            module_database,
            "SELECT der FROM responses WHERE serial = $1",
            serial_key(cert.serial_number),
        )[0]["der"]
        == stored_der
    )
    # keyCompromise stands against a lower reason, through the CLI too (one line, exit 1)
    assert responder.revoke("p256", cert.serial_number, "keyCompromise").status_code == 200
    lowered = responder.revoke("p256", cert.serial_number, "superseded")
    assert lowered.status_code == 409 and lowered.json()["reason"] == "keyCompromise"
    # the reason an answer names is one the API takes back (it said "key_compromise")
    back = responder.revoke("p256", cert.serial_number, lowered.json()["reason"])
    assert back.status_code == 200 and back.json()["updated"] is False, back.text
    result = cli_revoke(responder, cert.serial_number, "--reason", "superseded")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not applied" in result.stderr and "keyCompromise" in result.stderr, result.stderr
    assert stored_revocation(module_database, cert.serial_number) == (when, 1)


def test_cli_raises_reason_to_key_compromise(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    serial = random_serial()
    first = cli_revoke(responder, serial, "--reason", "cessationOfOperation")
    assert first.returncode == 0 and ": revoked at" in first.stdout, first.stderr
    raised = cli_revoke(responder, serial, "--reason", "1")
    assert raised.returncode == 0, raised.stderr
    assert "revocation updated: revoked at" in raised.stdout and "(keyCompromise)" in raised.stdout
    stored = stored_revocation(module_database, serial)
    assert stored is not None and stored[1] == 1


def test_merge_revocation_rules() -> None:
    """The decision table behind 200 / updated / 409, without a database."""
    from signer.response_builder import Revocation
    from signer.revocation import RevocationConflict, merge_revocation

    t0 = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
    earlier, later = t0 - dt.timedelta(days=1), t0 + dt.timedelta(days=1)
    kc, sup, ces = (
        x509.ReasonFlags.key_compromise,
        x509.ReasonFlags.superseded,
        x509.ReasonFlags.cessation_of_operation,
    )
    stored = Revocation(t0, sup)
    assert merge_revocation(stored, sup, None) == stored
    assert merge_revocation(stored, sup, t0) == stored
    assert merge_revocation(stored, kc, None) == Revocation(t0, kc)
    assert merge_revocation(stored, kc, later) == Revocation(t0, kc)
    assert merge_revocation(stored, kc, earlier) == Revocation(earlier, kc)
    assert merge_revocation(Revocation(t0, kc), kc, earlier) == Revocation(earlier, kc)
    assert merge_revocation(Revocation(t0, kc), kc, later) == Revocation(t0, kc)
    for reason, when in [(ces, None), (sup, earlier), (sup, later)]:
        with pytest.raises(RevocationConflict) as refused:
            merge_revocation(stored, reason, when)
        assert refused.value.stored == stored
    with pytest.raises(RevocationConflict):
        merge_revocation(Revocation(t0, kc), sup, None)


async def test_write_back_signed_before_a_reason_change_never_lands(
    database: str, p256_issuer: IssuerFiles
) -> None:
    """An on-demand answer signed from the old revocation (superseded) and written back
    after the reason became keyCompromise must not replace the stored keyCompromise
    response: within one second both carry the same thisUpdate (or the stale one a later
    one), so the write-back's time rule let it land, and SHA-1 answered superseded until
    the next refresh while SHA-256 answered keyCompromise."""
    from responder.store import PresignedStore
    from signer.issuers import issuer_from_certificate, make_responder
    from signer.response_builder import CertStatus, Revocation, ValidityPolicy, sign_response
    from signer.revocation import Revoker

    ca = p256_issuer.ca
    issuer = issuer_from_certificate("p256", ca.ca_cert)
    issuer.responders.append(
        make_responder(issuer, ca.responder_cert, ca.responder_key, delegated=True)
    )
    policy = ValidityPolicy()
    store = await PresignedStore.connect(database, max_size=2)
    try:
        await store.register_issuers([issuer])
        serial = random_serial()
        revoker = Revoker(store, policy)
        first = await revoker.revoke(issuer, serial, x509.ReasonFlags.superseded)
        await revoker.revoke(issuer, serial, x509.ReasonFlags.key_compromise)
        # what a lookup made before the change leads the live signer to sign, and to
        # queue for write-back; it is written after the change committed
        stale = sign_response(
            issuer,
            serial,
            CertStatus.REVOKED,
            policy,
            revocation=Revocation(first.revocation.revoked_at, x509.ReasonFlags.superseded),
        )
        await store.store_responses([(issuer.db_id, serial, stale)])
        der = await store.pool.fetchval(
            "SELECT der FROM responses WHERE serial = $1", serial_key(serial)
        )
        checked = check_response(
            bytes(der), issuer=p256_issuer, serial=serial, expect="revoked", openssl=False
        )
        assert checked.response.revocation_reason == x509.ReasonFlags.key_compromise
    finally:
        await store.close()


def test_revocation_time_is_rfc3339() -> None:
    """datetime.fromisoformat alone took a space for T and an offset with seconds (a time
    shifted by 30.5 s), and refused lowercase t/z, which RFC 3339 allows."""
    from signer.revocation import RevocationTimeError, parse_revocation_time

    utc = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    for text in (
        "2026-01-02T03:04:05Z",
        "2026-01-02t03:04:05z",
        "2026-01-02T04:04:05+01:00",
        "2026-01-02T03:04:05.999Z",
    ):
        assert parse_revocation_time(text) == utc, text
    for text in (
        "2026-01-02 03:04:05Z",
        "2026-01-02T03:04:05+00:00:30.5",
        "2026-01-02T03:04:05",
        "2026-01-02",
        "2026-13-02T03:04:05Z",
        "2026-01-02T03:04:60Z",
        "\u0662026-01-02T03:04:05Z",
    ):
        with pytest.raises(RevocationTimeError):
            parse_revocation_time(text)


def test_time_within_the_skew_tolerance_is_dated_now(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    """A revoked_at up to 5 min ahead (CA clock skew) was stored and signed as it was:
    a response whose revocationTime lies after its thisUpdate, saying the certificate
    was still valid for minutes after the answer that calls it revoked (a signature made
    with a compromised key meanwhile would pass a signing-time check). Dated now."""
    cert = p256_issuer.ca.issue_leaf("skew.test")
    assert responder.record(cert).status_code == 201
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4)
    resp = responder.revoke("p256", cert.serial_number, "superseded", revoked_at=iso(ahead))
    after = dt.datetime.now(dt.UTC)
    assert resp.status_code == 201, resp.text
    assert dt.datetime.fromisoformat(resp.json()["revoked_at"]) <= after
    stored = stored_revocation(module_database, cert.serial_number)
    assert stored is not None and stored[0] <= after
    # a retry of the same request (its time now further from ours) is a repeat, not a change
    time.sleep(1.1)
    again = responder.revoke("p256", cert.serial_number, "superseded", revoked_at=iso(ahead))
    assert again.status_code == 200 and again.json()["updated"] is False, again.text
    assert stored_revocation(module_database, cert.serial_number) == stored
    for alg in ("sha1", "sha256"):
        answer = httpx.post(
            responder.url,
            content=build_request(cert, p256_issuer.ca.ca_cert, alg=alg),
            headers={"Content-Type": "application/ocsp-request"},
        )
        checked = check_response(
            answer.content,
            issuer=p256_issuer,
            serial=cert.serial_number,
            alg=alg,
            expect="revoked",
            openssl=False,
        )
        assert checked.response.revocation_time_utc is not None
        assert checked.response.revocation_time_utc <= checked.response.this_update_utc


def test_revoking_a_serial_the_issuer_does_not_know_says_so(  # type: ignore[no-untyped-def]
    responder, p256_issuer, module_database
):
    """Revoking under the wrong issuer (or a mistyped serial) answered 201 exactly like a
    real revocation, while the certificate meant stayed "good". Still revoked (a lost
    recording must be revocable), but the answer says the serial was not known, and
    under which configured issuer it is."""
    cert = p256_issuer.ca.issue_leaf("wrong.issuer.test")
    assert responder.record(cert).status_code == 201
    wrong = responder.revoke("rsa", cert.serial_number, "keyCompromise")
    assert wrong.status_code == 201, wrong.text
    body = wrong.json()
    assert body["known"] is False and body["known_under"] == ["p256"], body
    assert "never recorded for issuer rsa" in body["warning"]
    assert "known under issuer p256" in body["warning"]

    lost = random_serial()
    unknown = responder.revoke("p256", lost, "superseded").json()
    assert unknown["known"] is False and unknown["known_under"] == [], unknown
    assert "never recorded for issuer p256" in unknown["warning"]
    stored = stored_revocation(module_database, lost)
    assert stored is not None and stored[1] == 4  # revoked all the same

    right = responder.revoke("p256", cert.serial_number, "keyCompromise").json()
    assert right["known"] is True and "warning" not in right, right

    # known only from CT (its recording was lost): known here, named from the other issuer
    logged = random_serial()
    sql_sync(
        module_database,
        "INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, logged_at) "
        "SELECT id, $1, 1, 0, 1, now() FROM issuers WHERE name = 'p256'",
        serial_key(logged),
    )
    elsewhere = responder.revoke("rsa", logged, "superseded").json()
    assert elsewhere["known"] is False and elsewhere["known_under"] == ["p256"], elsewhere
    in_ct = responder.revoke("p256", logged, "superseded").json()
    assert in_ct["known"] is True and "warning" not in in_ct, in_ct

    cli = cli_revoke(responder, random_serial())
    assert cli.returncode == 0, cli.stderr
    assert "warning: serial was never recorded for issuer p256" in cli.stderr


def test_each_revocation_has_its_own_audit_line(responder, p256_issuer):  # type: ignore[no-untyped-def]
    """The only log line of an API revocation was "admin POST /v1/revocations -> 201":
    which certificate, for what reason and time, was in the database only (BR 5.4.1 asks
    for revocation events in the audit log). Now one line per revocation says it."""
    cert = p256_issuer.ca.issue_leaf("audit.line.test")
    assert responder.record(cert).status_code == 201
    serial = format_serial(cert.serial_number)
    assert responder.revoke("p256", cert.serial_number, "superseded").status_code == 201
    assert responder.revoke("p256", cert.serial_number, "keyCompromise").status_code == 200
    log = responder.log()
    assert f"revocation recorded: issuer=p256 serial={serial} reason=superseded" in log
    assert f"revocation updated: issuer=p256 serial={serial} reason=keyCompromise" in log


def test_deeply_nested_json_is_a_400(responder):  # type: ignore[no-untyped-def]
    """A body of 16,000 "[" (under the 16 kB limit) made the JSON decoder raise
    RecursionError: answered 500 "internal error". It is bad input: 400."""
    for body in (b"[" * 16_000, b'{"issuer":' * 1600):
        resp = httpx.post(
            responder.admin_url + "/v1/revocations",
            content=body,
            headers={"Authorization": f"Bearer {responder.token}"},
            timeout=30,
        )
        assert resp.status_code == 400, resp.text
        assert "nested too deeply" in resp.json()["error"]
