"""Fuzzing the OCSP request parser and GET path decoder through the real ASGI app.

The app is ``OCSPApp`` as ``serve`` builds it, on a real ``ResponderService`` with a real
database, called in-process with raw ASGI messages (no sockets: thousands of requests a
second). Inputs are mutations of valid requests (bit flips, truncation, insertion,
splices of two requests), random bytes, and random re-encodings of the GET path.

Properties: no exception escapes, never a 5xx, and every answer is either a 4xx with a
plain-text reason, or an OCSP response that parses, is not ``internalError``, and - when
successful - verifies under the issuer's responder key for a serial we recorded.

CI runs ``OCSP_FUZZ_EXAMPLES`` (default 200) examples per property; a longer run:

    OCSP_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from responder.config import load_config
from responder.ocsp_app import OCSPApp
from responder.server import build_ocsp_app
from responder.service import ResponderService
from tests.support import IssuerFiles, build_request, duplicated_nonce_request, write_config

EXAMPLES = int(os.environ.get("OCSP_FUZZ_EXAMPLES", "200"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ALLOWED_PLAIN = {304, 400, 404, 405, 413, 415}


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    app: OCSPApp
    service: ResponderService
    signers: list[Any]
    recorded: set[int]
    seeds: list[bytes] = field(default_factory=list)


@pytest.fixture(scope="module")
def harness(
    module_database: str, p256_issuer: IssuerFiles, rsa_issuer: IssuerFiles, workdir: Path
) -> Iterator[Harness]:
    proc = write_config(workdir / "fuzz", module_database, [p256_issuer, rsa_issuer])
    config = load_config(proc.config_path, {})
    loop = asyncio.new_event_loop()
    service = ResponderService(config)
    loop.run_until_complete(service.start(pool_size=4))
    good = p256_issuer.ca.issue_leaf("fuzz-good.test")
    rsa_good = rsa_issuer.ca.issue_leaf("fuzz-rsa.test")
    loop.run_until_complete(service.recorder.record([good]))
    loop.run_until_complete(service.recorder.record([rsa_good]))
    harness = Harness(
        loop,
        build_ocsp_app(service),
        service,
        [p256_issuer.ca.responder_cert.public_key(), rsa_issuer.ca.ca_cert.public_key()],
        {good.serial_number, rsa_good.serial_number},
    )
    for cert, issuer in ((good, p256_issuer), (rsa_good, rsa_issuer)):
        for alg in ("sha1", "sha256", "sha512"):
            harness.seeds.append(build_request(cert, issuer.ca.ca_cert, alg=alg))
        harness.seeds.append(build_request(cert, issuer.ca.ca_cert, nonce=b"\x01" * 16))
    harness.seeds.append(build_request(None, p256_issuer.ca.ca_cert, serial=12345))
    try:
        yield harness
    finally:
        loop.run_until_complete(service.close())
        loop.close()


def call(
    h: Harness, method: str, path: bytes, body: bytes = b"", content_type: bytes | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through the ASGI app; returns (status, headers, body)."""
    headers = [(b"host", b"ocsp.test")]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if method == "POST":
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path.decode("latin-1"),
        "raw_path": path,
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    h.loop.run_until_complete(h.app(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], dict(starts[0]["headers"]), out


def check_answer(
    h: Harness, method: str, status: int, headers: dict[bytes, bytes], body: bytes
) -> None:
    assert status < 500, status
    if headers.get(b"content-type") != b"application/ocsp-response":
        assert status in ALLOWED_PLAIN, status
        return
    assert status in (200, 304), status
    if method == "HEAD" or status == 304:
        assert body == b""
        return
    resp = ocsp.load_der_ocsp_response(body)
    assert resp.response_status != ocsp.OCSPResponseStatus.INTERNAL_ERROR
    if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL:
        assert resp.serial_number in h.recorded
        assert resp.signature_hash_algorithm is not None
        for key in h.signers:
            try:
                if isinstance(key, ec.EllipticCurvePublicKey):
                    key.verify(
                        resp.signature,
                        resp.tbs_response_bytes,
                        ec.ECDSA(resp.signature_hash_algorithm),
                    )
                elif isinstance(key, rsa.RSAPublicKey):
                    key.verify(
                        resp.signature,
                        resp.tbs_response_bytes,
                        padding.PKCS1v15(),
                        resp.signature_hash_algorithm,
                    )
                return
            except Exception:
                continue
        raise AssertionError("successful response not signed by a configured responder")


@st.composite
def mutated_der(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid request, then a few edits: flip, set, delete, insert, truncate, splice."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "splice"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0x82, 0xFF, 0x30, 0x04]))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[i:]
        else:
            other = draw(st.sampled_from(seeds))
            j = draw(st.integers(0, len(other)))
            data = data[:i] + bytearray(other[j:])
    return bytes(data)


def request_bytes(h: Harness) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated_der(h.seeds),
        st.binary(max_size=300),
        st.sampled_from(h.seeds),
    )


@st.composite
def get_path(draw: st.DrawFn, h: Harness) -> bytes:
    """A GET path: a (mutated) request in one of the encodings clients use, then edits."""
    der = draw(request_bytes(h))
    b64 = base64.b64encode(der).decode()
    style = draw(st.sampled_from(["quoted", "raw", "space", "nopad", "urlsafe", "double"]))
    if style == "quoted":
        text = quote(b64, safe="")
    elif style == "raw":
        text = b64
    elif style == "space":
        text = b64.replace("+", " ")
    elif style == "nopad":
        text = b64.rstrip("=")
    elif style == "urlsafe":
        text = base64.urlsafe_b64encode(der).decode()
    else:
        text = quote(quote(b64, safe=""), safe="")
    path = bytearray(b"/" + text.encode())
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(path)))
        path[i:i] = draw(
            st.sampled_from(
                [b"/", b"//", b"%", b"%2", b"%zz", b"%00", b"=", b"+", b"\xff", b"?", b"#", b".."]
            )
        )
    return bytes(path)


def test_seeds_answer_successfully(harness: Harness) -> None:
    """The properties below would be vacuous if valid requests did not succeed."""
    for der in harness.seeds[:-1]:
        for method, path, body, ctype in (
            ("GET", b"/" + quote(base64.b64encode(der).decode(), safe="").encode(), b"", None),
            ("POST", b"/", der, b"application/ocsp-request"),
        ):
            status, headers, out = call(harness, method, path, body, ctype)
            assert status == 200
            resp = ocsp.load_der_ocsp_response(out)
            assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
            check_answer(harness, method, status, headers, out)
    status, _, out = call(harness, "GET", b"/" + base64.b64encode(harness.seeds[-1]))
    assert ocsp.load_der_ocsp_response(out).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_fuzz_post_bodies(harness: Harness) -> None:
    @FUZZ_SETTINGS
    @given(
        body=request_bytes(harness),
        ctype=st.sampled_from(
            [b"application/ocsp-request", None, b"application/OCSP-request; x=1", b"text/plain"]
        ),
        path=st.sampled_from([b"/", b"", b"//", b"/x"]),
    )
    def run(body: bytes, ctype: bytes | None, path: bytes) -> None:
        status, headers, out = call(harness, "POST", path or b"/", body, ctype)
        check_answer(harness, "POST", status, headers, out)

    run()


def test_fuzz_get_paths(harness: Harness) -> None:
    @FUZZ_SETTINGS
    @given(path=get_path(harness), method=st.sampled_from(["GET", "HEAD"]))
    def run(path: bytes, method: str) -> None:
        status, headers, out = call(harness, method, path)
        check_answer(harness, method, status, headers, out)

    run()


def test_fuzz_raw_paths_and_methods(harness: Harness) -> None:
    """Arbitrary bytes as the path, odd methods: the router must not trip either."""

    @FUZZ_SETTINGS
    @given(
        path=st.binary(max_size=200).map(lambda b: b"/" + b),
        method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get"]),
        body=st.binary(max_size=64),
    )
    def run(path: bytes, method: str, body: bytes) -> None:
        status, headers, out = call(harness, method, path, body if method == "POST" else b"")
        check_answer(harness, method, status, headers, out)

    run()


def test_oversized_bodies_are_4xx(harness: Harness) -> None:
    for size in (10 * 1024 + 1, 64 * 1024):
        status, _, _ = call(harness, "POST", b"/", b"\x30" * size, b"application/ocsp-request")
        assert status == 413
    sha = hashes.Hash(hashes.SHA256())
    sha.update(b"x")
    status, headers, out = call(harness, "GET", b"/" + base64.b64encode(sha.finalize() * 400))
    check_answer(harness, "GET", status, headers, out)


def test_duplicated_extension_is_malformed_request(
    harness: Harness, p256_issuer: IssuerFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """Two nonce extensions (RFC 5280 4.2: at most one of each): malformedRequest by GET
    and POST, and no ERROR line (it was internalError plus a traceback per request)."""
    der = duplicated_nonce_request(p256_issuer.ca.ca_cert, min(harness.recorded))
    with caplog.at_level(logging.ERROR):
        for method, path, body, ctype in (
            ("GET", b"/" + quote(base64.b64encode(der).decode(), safe="").encode(), b"", None),
            ("POST", b"/", der, b"application/ocsp-request"),
        ):
            status, headers, out = call(harness, method, path, body, ctype)
            assert status == 200 and headers[b"content-type"] == b"application/ocsp-response"
            status_code = ocsp.load_der_ocsp_response(out).response_status
            assert status_code == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
