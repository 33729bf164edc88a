"""Structured logs: JSON lines with the request fields, errors complete, successes sampled,
and never any key material (checked on the whole log of a real run)."""

from __future__ import annotations

import base64
import io
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from responder import request_log
from responder.log_format import JSONFormatter, TextFormatter, make_formatter
from tests.support import VENV_BIN, IssuerFiles, build_request, get_url, write_config


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("ocsp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_request_log_fields_errors_complete_successes_sampled(captured: io.StringIO) -> None:
    common = {"method": "GET", "source": "cache", "issuer": "r1", "seconds": 0.00012}
    for i in range(3 * request_log.SUCCESS_SAMPLE_EVERY):
        request_log.log_answer(
            request_id=i,
            result="good",
            serial=0xABC,
            error=False,
            **common,  # type: ignore[arg-type]
        )
    for i in range(5):
        request_log.log_answer(
            request_id=10_000 + i,
            result="try_later",
            serial=None,
            error=True,
            **common,  # type: ignore[arg-type]
        )
    entries = lines(captured)
    errors = [e for e in entries if e["result"] == "try_later"]
    successes = [e for e in entries if e["result"] == "good"]
    assert [e["request_id"] for e in errors] == [10_000 + i for i in range(5)]
    assert len(successes) == 3  # one in SUCCESS_SAMPLE_EVERY
    first = successes[0]
    assert first["level"] == "info" and first["logger"] == "ocsp.requests"
    assert first["serial"] == "abc" and first["issuer"] == "r1" and first["sampled"] is True
    assert first["duration_ms"] == 0.12 and first["msg"] == "ocsp GET good"
    assert errors[0]["level"] == "warning" and errors[0]["sampled"] is False
    assert str(first["ts"]).endswith("+00:00")


def test_pem_blocks_are_redacted_everywhere(p256_issuer: IssuerFiles) -> None:
    pem = p256_issuer.ca.responder_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "loaded %s", (pem,), None)
    record.detail = "key=" + pem  # an extra field
    try:
        raise ValueError(pem[:60])  # a truncated block in an exception message
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    body = pem.splitlines()[1]
    for formatter in (JSONFormatter(), TextFormatter()):
        text = formatter.format(record)
        assert "PRIVATE KEY" not in text and "-----BEGIN" not in text and body not in text
        assert "[redacted PEM block]" in text
    with pytest.raises(ValueError, match="log_format"):
        make_formatter("xml")


def test_full_run_logs_json_without_key_material(  # type: ignore[no-untyped-def]
    module_database, p256_issuer, rsa_issuer, workdir
):
    proc = write_config(
        workdir / "jsonlog",
        module_database,
        [p256_issuer, rsa_issuer],
        extra='log_format = "json"\nlog_success_sample_every = 1\n',
    ).start()
    try:
        cert = p256_issuer.ca.issue_leaf("jsonlog.test")
        assert proc.record(cert).status_code == 201
        der = build_request(cert, p256_issuer.ca.ca_cert, alg="sha256")
        assert httpx.get(get_url(proc.url, der)).status_code == 200
        httpx.post(
            proc.url + "/",
            content=b"\x30\x00",
            headers={"Content-Type": "application/ocsp-request"},
        )
        assert proc.revoke("p256", cert.serial_number).status_code == 201
        assert httpx.post(proc.admin_url + "/v1/certificates", content=b"x").status_code == 401
        # a terminal escape in the path (anyone's input, unauthenticated) is logged escaped
        assert httpx.post(proc.admin_url + "/v1/y%1B[31mRED").status_code == 401
        assert httpx.get(proc.admin_url + "/metrics").status_code == 200
        echoed = httpx.post(
            proc.admin_url + "/v1/certificates",
            content=b"junk",
            headers={"Authorization": f"Bearer {proc.token}", "X-Request-ID": "ca-req-42"},
        )
        assert echoed.status_code == 400 and echoed.headers["x-request-id"] == "ca-req-42"
    finally:
        proc.stop()
    log = proc.log()
    entries = [orjson.loads(line) for line in log.splitlines() if line.strip()]
    assert entries, "no log lines"
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert any(e["logger"] == "responder.server" and "serving OCSP" in e["msg"] for e in entries)
    admin = [e for e in entries if e["logger"] == "responder.admin_app"]
    refused = [e for e in admin if e.get("status") == 401]
    assert refused and refused[0]["client"] == "127.0.0.1" and refused[0]["level"] == "warning"
    assert refused[0]["msg"] == "admin POST /v1/certificates -> 401"
    assert any(e["msg"] == "admin POST /v1/y\\x1b[31mRED -> 401" for e in refused), refused
    assert "\x1b" not in log
    created = [e for e in admin if e.get("status") == 201]
    assert len(created) == 2 and all(len(str(e["request_id"])) == 32 for e in created)
    assert any(e.get("request_id") == "ca-req-42" for e in admin)
    assert not any("color_message" in e for e in entries)
    # no key material of any configured key, in any encoding, and not the admin token
    forbidden = ["-----BEGIN", "PRIVATE KEY", proc.token]
    for issuer in (p256_issuer, rsa_issuer):
        for key in (issuer.ca.responder_key, issuer.ca.ca_key):
            der = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            forbidden += [der[-24:].hex(), base64.b64encode(der[-24:]).decode()[:24]]
            numbers = key.private_numbers()  # type: ignore[union-attr]
            secret = numbers.private_value if hasattr(numbers, "private_value") else numbers.d
            forbidden += [format(secret, "x")[:24], str(secret)[:24]]
    for needle in forbidden:
        assert needle not in log, needle


def test_cli_commands_log_json_when_configured(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """``log_format = "json"`` holds for every command, not only serve/issue/revoke/migrate:
    import (and refresh, ct-follow, ct-status, audit) logged text, so the ct-follow unit
    of docs/deploy.md wrote text lines into a journal read as JSON."""
    proc = write_config(tmp_path, database, [p256_issuer], extra='log_format = "json"')
    result = subprocess.run(
        [
            str(VENV_BIN / "ocsp-responder"),
            "import",
            "--config",
            str(proc.config_path),
            "--quiet",
            "--no-journal",
            str(p256_issuer.root_pem),  # an issuer not configured: refused, logged
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    logged = [line for line in result.stderr.splitlines() if "recording refused" in line]
    assert logged, result.stderr
    entry = orjson.loads(logged[0])
    assert entry["level"] == "warning" and entry["logger"] == "signer.recording"
