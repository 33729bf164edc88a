"""Signing certificates near or past their end, against a real `serve`.

- An issuer whose responder certificate has expired (or whose PKCS#11 token disappears
  mid-run) answers ``tryLater`` for what it would have to sign, says so in ONE log line per
  outage (no traceback per request), counts every failure, and refuses recordings with a
  503 that names the cause (not "internal error").
- An issuer whose last responder certificate expires within ``response_validity`` + 7 days
  is announced by a WARNING line and ``ocsp_signer_expiry_timestamp_seconds``.
- nextUpdate never passes the issuer certificate's notAfter either.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from responder.protocol import TRY_LATER
from signer.demo_ca import DemoCA, create_ca
from tests.softhsm import SoftHSMToken, softhsm_module
from tests.stored_rows import issuer_with_responder, load_issuer, put_certificate
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    issuer_files,
    write_config,
)


def with_issuer_lifetime(ca: DemoCA, lifetime: dt.timedelta) -> DemoCA:
    """The same issuing CA (name, key, extensions) re-issued by its root to end sooner."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.ca_cert.subject)
        .issuer_name(ca.root_cert.subject)
        .public_key(ca.ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + lifetime)
    )
    for ext in ca.ca_cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return dataclasses.replace(ca, ca_cert=builder.sign(ca.root_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def expired(workdir: Path) -> IssuerFiles:
    """Its only responder certificate ended 20 days ago."""
    return issuer_with_responder(
        "expired", workdir, valid_from=dt.timedelta(days=30), valid_for=dt.timedelta(days=10)
    )


@pytest.fixture(scope="module")
def ending(workdir: Path) -> IssuerFiles:
    """Its responder certificate ends in 5 days: within response_validity (4d) + 7 days."""
    return issuer_with_responder(
        "ending", workdir, valid_from=dt.timedelta(days=60), valid_for=dt.timedelta(days=65)
    )


@pytest.fixture(scope="module")
def not_yet(workdir: Path) -> IssuerFiles:
    """Its only responder certificate starts in 3 days (configured too early)."""
    return issuer_with_responder(
        "notyet", workdir, valid_from=-dt.timedelta(days=3), valid_for=dt.timedelta(days=90)
    )


@pytest.fixture(scope="module")
def short_ca(workdir: Path) -> IssuerFiles:
    """A responder valid for a year under an issuing CA certificate that ends in 2 days."""
    return issuer_files(
        "shortca", with_issuer_lifetime(create_ca("p256", "Short"), dt.timedelta(days=2)), workdir
    )


@pytest.fixture(scope="module")
def lifecycle_responder(
    module_database: str,
    expired: IssuerFiles,
    ending: IssuerFiles,
    short_ca: IssuerFiles,
    not_yet: IssuerFiles,
    workdir: Path,
) -> Iterator[ResponderProcess]:
    proc = write_config(
        workdir / "lifecycle", module_database, [expired, ending, short_ca, not_yet]
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def metric(proc: ResponderProcess, name: str, **labels: str) -> float:
    text = httpx.get(
        proc.admin_url + "/metrics", headers={"Authorization": f"Bearer {proc.token}"}, timeout=10
    ).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if not line.startswith((f"{name}{{", f"{name} ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{wanted}}} in /metrics")


def wait_for_log(proc: ResponderProcess, needle: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in proc.log():
            return proc.log()
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not logged:\n{proc.log()[-3000:]}")


def test_no_valid_responder_is_one_line_and_try_later(  # type: ignore[no-untyped-def]
    lifecycle_responder, expired, module_database
):
    proc = lifecycle_responder
    issuer = load_issuer(proc.config_path, expired.name, module_database)
    cert = expired.ca.issue_leaf("no-signer.test")
    # recording needs a signature: refused with the cause, nothing recorded
    refused = proc.record(cert)
    assert refused.status_code == 503
    assert "no responder certificate is valid now" in refused.json()["error"]
    put_certificate(module_database, issuer, cert)  # recorded (as a CA would have, earlier)
    for alg in ("sha1", "sha256", "sha256", "sha384", "sha512"):
        answer = httpx.get(get_url(proc.url, build_request(cert, expired.ca.ca_cert, alg=alg)))
        assert answer.content == TRY_LATER
        assert answer.headers["cache-control"] == "no-cache"
    log = wait_for_log(proc, "on-demand signing refused for issuer expired")
    assert "Traceback" not in log
    assert log.count("on-demand signing refused for issuer expired") == 1
    assert metric(
        proc, "ocsp_on_demand_signing_failures_total", issuer="expired", error="SigningError"
    ) == pytest.approx(5)
    # the refresher says it too, at ERROR, and the start-up expiry check
    assert re.search(r"ERROR .*refresher: issuer expired: signing refused", log)
    assert re.search(r"ERROR .*issuer expired cannot sign", log)


def test_responder_ending_soon_is_announced(lifecycle_responder, ending):  # type: ignore[no-untyped-def]
    proc = lifecycle_responder
    ends = ending.ca.responder_cert.not_valid_after_utc
    assert metric(proc, "ocsp_signer_expiry_timestamp_seconds", issuer="ending") == ends.timestamp()
    log = wait_for_log(proc, "issuer ending: its last responder certificate")
    assert re.search(r"WARNING .*issuer ending: .* expires " + f"{ends:%Y-%m-%d %H:%M}Z", log)
    # still signing, capped at nothing yet (5 days > 4 days + 1 hour)
    cert = ending.ca.issue_leaf("ending.test")
    assert proc.record(cert).status_code == 201
    der = httpx.get(get_url(proc.url, build_request(cert, ending.ca.ca_cert))).content
    check_response(der, issuer=ending, serial=cert.serial_number)


def test_next_update_never_passes_the_issuer_certificate(lifecycle_responder, short_ca):  # type: ignore[no-untyped-def]
    proc = lifecycle_responder
    ca_not_after = short_ca.ca.ca_cert.not_valid_after_utc
    assert short_ca.ca.responder_cert.not_valid_after_utc > ca_not_after + dt.timedelta(days=30)
    cert = short_ca.ca.issue_leaf("short-ca.test", lifetime=dt.timedelta(days=1))
    assert proc.record(cert).status_code == 201
    for alg in ("sha1", "sha256"):  # pre-signed at recording, and signed on demand
        der = httpx.get(get_url(proc.url, build_request(cert, short_ca.ca.ca_cert, alg=alg)))
        checked = check_response(der.content, issuer=short_ca, serial=cert.serial_number, alg=alg)
        next_update = checked.response.next_update_utc
        assert next_update is not None and next_update <= ca_not_after
    assert metric(proc, "ocsp_signer_expiry_timestamp_seconds", issuer="shortca") == pytest.approx(
        ca_not_after.timestamp()
    )


if softhsm_module() is None and os.environ.get("CI"):
    raise RuntimeError("SoftHSM2 missing in CI: .ci/run installs package softhsm2")


@pytest.mark.skipif(softhsm_module() is None, reason="SoftHSM2 missing: apt-get install softhsm2")
def test_token_gone_mid_run_is_try_later_without_traceback_storm(database, tmp_path):  # type: ignore[no-untyped-def]
    token = SoftHSMToken.create(tmp_path / "hsm", label="vanishing")
    files = issuer_files("vanishing", create_ca("p256", "Vanishing"), tmp_path / "ca")
    token.import_key(files.directory / "responder.key", "ocsp", "01")
    (files.directory / "responder.key").unlink()
    proc = write_config(tmp_path / "serve", database, [], extra="refresher = false\n")
    proc.config_path.write_text(
        proc.config_path.read_text()
        + f'[[issuers]]\nname = "vanishing"\ncertificate = "{files.ca_pem}"\n'
        f'responder_certificate = "{files.directory / "responder.pem"}"\n'
        f'responder_key = "{token.uri("ocsp")}"\n'
    )
    proc.env.update(token.env)
    proc.start()
    try:
        cert = files.ca.issue_leaf("before.test")
        assert proc.record(cert).status_code == 201
        shutil.rmtree(token.directory / "tokens")  # the HSM is gone
        (token.directory / "tokens").mkdir()
        # the pre-signed SHA-1 answer is still served; what must be signed is tryLater
        sha1 = httpx.get(get_url(proc.url, build_request(cert, files.ca.ca_cert)))
        check_response(sha1.content, issuer=files, serial=cert.serial_number)
        for alg in ("sha256", "sha384", "sha512", "sha256"):
            answer = httpx.get(get_url(proc.url, build_request(cert, files.ca.ca_cert, alg=alg)))
            assert answer.content == TRY_LATER
            assert ocsp.load_der_ocsp_response(answer.content).response_status == (
                ocsp.OCSPResponseStatus.TRY_LATER
            )
        refused = proc.record(files.ca.issue_leaf("after.test"))
        assert refused.status_code == 503
        assert "pkcs11 token 'vanishing' key 'ocsp'" in refused.json()["error"]
        log = wait_for_log(proc, "on-demand signing refused for issuer vanishing")
        assert "Traceback" not in log
        assert log.count("on-demand signing refused for issuer vanishing") == 1
        assert "reason=signing" in log  # the recording failure is counted as signing
    finally:
        proc.stop()


def test_no_responder_valid_yet_is_logged_at_start(lifecycle_responder, not_yet):  # type: ignore[no-untyped-def]
    log = wait_for_log(lifecycle_responder, "issuer notyet cannot sign")
    starts = f"{not_yet.ca.responder_cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z"
    assert re.search(
        r"ERROR .*issuer notyet cannot sign: .*no responder certificate is valid now", log
    )
    assert starts in log  # the line says when the configured one becomes valid
    ready = httpx.get(lifecycle_responder.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and "notyet" in ready.text


def test_capped_responses_are_not_overdue(module_database, workdir):  # type: ignore[no-untyped-def]
    """A responder certificate ending in 30 h caps every new response at its notAfter, and
    such a response is renewed at its own BR deadline (the refresher's rule): readiness
    must not count it overdue (every instance would turn not-ready at once, 42 h before
    the certificate ends, while the responses are valid and renewed on time)."""
    capped = issuer_with_responder(
        "capped",
        workdir,
        valid_from=dt.timedelta(days=60),
        valid_for=dt.timedelta(days=61, hours=6),
    )
    proc = write_config(workdir / "capped", module_database, [capped]).start()
    try:
        cert = capped.ca.issue_leaf("capped.test")
        assert proc.record(cert).status_code == 201
        der = httpx.get(get_url(proc.url, build_request(cert, capped.ca.ca_cert))).content
        checked = check_response(der, issuer=capped, serial=cert.serial_number)
        assert checked.response.next_update_utc == capped.ca.responder_cert.not_valid_after_utc
        proc.stop()
        proc.start()  # readiness counts at start
        ready = proc.ready()
        assert ready.status_code == 200, ready.text
        assert metric(proc, "ocsp_responses_overdue_refresh") == 0
    finally:
        proc.stop()


def test_this_update_is_never_before_the_signer_existed(module_database, workdir):  # type: ignore[no-untyped-def]
    """A responder certificate 10 minutes old: thisUpdate is backdated 1 h for client clock
    skew, but not to before its signer's notBefore (it said the status was known correct
    by a signer that did not exist yet), by the pre-signed path and on demand alike."""
    young = issuer_with_responder(
        "young", workdir, valid_from=dt.timedelta(minutes=10), valid_for=dt.timedelta(days=30)
    )
    proc = write_config(workdir / "young", module_database, [young]).start()
    try:
        cert = young.ca.issue_leaf("young.test")
        assert proc.record(cert).status_code == 201
        born = young.ca.responder_cert.not_valid_before_utc
        for alg in ("sha1", "sha256"):  # stored at recording; signed on demand
            der = build_request(cert, young.ca.ca_cert, alg=alg)
            answer = httpx.post(proc.url, content=der).content
            checked = check_response(answer, issuer=young, serial=cert.serial_number, alg=alg)
            assert checked.response.this_update_utc == born
    finally:
        proc.stop()


def test_capped_responses_are_warmed_up(database, workdir):  # type: ignore[no-untyped-def]
    """Warm-up reckons a row's renewal point as the serving path does: a response capped by
    a responder certificate ending in 30 h is due at its BR deadline, not at nextUpdate -
    refresh_margin (which lies before its thisUpdate). Every capped row was left out of the
    warm-up, and every request for one went to the database."""
    capped = issuer_with_responder(
        "warmcapped",
        workdir,
        valid_from=dt.timedelta(days=60),
        valid_for=dt.timedelta(days=61, hours=6),
    )
    proc = write_config(workdir / "warmcapped", database, [capped]).start()
    try:
        cert = capped.ca.issue_leaf("warm-capped.test")
        assert proc.record(cert).status_code == 201
        proc.stop()
        proc.start()
        deadline = time.monotonic() + 10  # the log holds both runs: wait for the second
        while proc.log().count("warm-up: ") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        last = re.findall(r"warm-up: (\d+) responses in memory", proc.log())
        assert last[-1:] == ["1"], proc.log()[-2000:]
        der = httpx.get(get_url(proc.url, build_request(cert, capped.ca.ca_cert))).content
        checked = check_response(der, issuer=capped, serial=cert.serial_number)
        assert checked.response.next_update_utc == capped.ca.responder_cert.not_valid_after_utc
    finally:
        proc.stop()
