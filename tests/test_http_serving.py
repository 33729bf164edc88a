"""OCSP over real HTTP: GET/POST/HEAD forms, CertID hashes, caching headers, errors."""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from responder.protocol import MALFORMED_REQUEST, UNAUTHORIZED
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    cert_id_request,
    check_response,
    critical_extension_request,
    get_url,
    sql_sync,
    with_single_request_extension,
    write_config,
)

OCSP_TYPE = "application/ocsp-response"


@pytest.fixture(scope="module", params=["native", "uvicorn"])
def responder(  # type: ignore[no-untyped-def]
    request, module_database: str, p256_issuer: IssuerFiles, rsa_issuer: IssuerFiles, workdir
) -> Iterator[ResponderProcess]:
    """Every test here runs against both HTTP servers of the OCSP port: the native one
    (the default) and uvicorn over the ASGI adapter (``ocsp_http_server = "uvicorn"``)."""
    proc = write_config(
        workdir / request.param,
        module_database,
        [p256_issuer, rsa_issuer],
        extra=f'ocsp_http_server = "{request.param}"\nocsp_keep_alive_timeout = "2s"',
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def good_cert(responder: ResponderProcess, p256_issuer: IssuerFiles):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("good.test")
    assert responder.record(cert).status_code == 201
    return cert


def post(url: str, der: bytes) -> httpx.Response:
    return httpx.post(url, content=der, headers={"Content-Type": "application/ocsp-request"})


@pytest.mark.parametrize("style", ["quoted", "raw", "space", "urlsafe"])
def test_get_forms_answer_good(responder, p256_issuer, good_cert, style):  # type: ignore[no-untyped-def]
    der = build_request(good_cert, p256_issuer.ca.ca_cert)
    # make sure the base64 has a '+' or '/' so the encodings differ: search serial space
    resp = httpx.get(get_url(responder.url, der, style=style))
    assert resp.status_code == 200
    assert resp.headers["content-type"] == OCSP_TYPE
    check_response(resp.content, issuer=p256_issuer, serial=good_cert.serial_number)


def test_plus_encodings_are_equivalent(responder, p256_issuer):  # type: ignore[no-untyped-def]
    """'+' arrives as '+', '%2B' or a space; all must decode to the same request."""
    # find a recorded serial whose request base64 contains '+'
    for _ in range(200):
        cert = p256_issuer.ca.issue_leaf("plus.test")
        der = build_request(cert, p256_issuer.ca.ca_cert)
        if "+" in base64.b64encode(der).decode():
            break
    else:
        pytest.fail("no request with '+' in its base64")
    assert responder.record(cert).status_code == 201
    b64 = base64.b64encode(der).decode()
    bodies = set()
    for path in (b64, b64.replace("+", "%2B"), b64.replace("+", "%20"), b64.replace("/", "%2F")):
        resp = httpx.get(f"{responder.url}/{path}")
        assert resp.status_code == 200
        check_response(resp.content, issuer=p256_issuer, serial=cert.serial_number)
        bodies.add(resp.content)
    assert len(bodies) == 1  # the same pre-signed bytes every time


def test_double_leading_slash_and_missing_padding(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    der = build_request(good_cert, p256_issuer.ca.ca_cert)
    b64 = base64.b64encode(der).decode()
    for path in ("//" + b64, "/" + b64.rstrip("=")):
        resp = httpx.get(responder.url + path)
        assert resp.status_code == 200, path
        check_response(resp.content, issuer=p256_issuer, serial=good_cert.serial_number)


def test_post_answers_good(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    der = build_request(good_cert, p256_issuer.ca.ca_cert)
    resp = post(responder.url + "/", der)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == OCSP_TYPE
    check_response(resp.content, issuer=p256_issuer, serial=good_cert.serial_number)


def test_head_like_get_without_body(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    url = get_url(responder.url, build_request(good_cert, p256_issuer.ca.ca_cert))
    got, head = httpx.get(url), httpx.head(url)
    assert head.status_code == 200 and head.content == b""
    for name in ("content-type", "content-length", "etag", "last-modified", "expires"):
        assert head.headers[name] == got.headers[name]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_405(responder, method):  # type: ignore[no-untyped-def]
    resp = httpx.request(method, responder.url + "/")
    assert resp.status_code == 405
    assert "GET" in resp.headers["allow"]


@pytest.mark.parametrize("alg", ["sha256", "sha384", "sha512"])
def test_certid_hash_is_echoed(responder, p256_issuer, good_cert, alg):  # type: ignore[no-untyped-def]
    der = build_request(good_cert, p256_issuer.ca.ca_cert, alg=alg)
    for resp in (httpx.get(get_url(responder.url, der)), post(responder.url, der)):
        assert resp.status_code == 200
        check_response(resp.content, issuer=p256_issuer, serial=good_cert.serial_number, alg=alg)


SHA1_OID, SHA256_OID = "1.3.14.3.2.26", "2.16.840.1.101.3.4.2.1"


def test_hash_parameters_absent_are_answered_like_null(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    """Clients send the hash AlgorithmIdentifier with NULL parameters or none (RFC 5754
    2): both get the answer, with the request's hash algorithm in its CertID."""
    from signer.issuers import issuer_from_certificate

    hashes_of = issuer_from_certificate("x", p256_issuer.ca.ca_cert).cert_id_hashes
    for alg, oid in (("sha1", SHA1_OID), ("sha256", SHA256_OID)):
        der = cert_id_request(oid, *hashes_of[alg], good_cert.serial_number, null_params=False)
        for resp in (httpx.get(get_url(responder.url, der)), post(responder.url, der)):
            check_response(
                resp.content, issuer=p256_issuer, serial=good_cert.serial_number, alg=alg
            )


def test_cert_id_hashes_of_the_wrong_length_are_malformed(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    """An issued serial under hashes that are no digest of the named algorithm (SHA-1
    hashes labelled SHA-256, a truncated one) was answered ``unauthorized``, as if our
    issuer were unknown: it is a malformed CertID."""
    from signer.issuers import issuer_from_certificate

    name_hash, key_hash = issuer_from_certificate("x", p256_issuer.ca.ca_cert).cert_id_hashes[
        "sha1"
    ]
    serial = good_cert.serial_number
    for der in (
        cert_id_request(SHA256_OID, name_hash, key_hash, serial),
        cert_id_request(SHA1_OID, name_hash[:-1], key_hash, serial),
    ):
        _assert_error(post(responder.url, der), MALFORMED_REQUEST)
        _assert_error(httpx.get(get_url(responder.url, der)), MALFORMED_REQUEST)


def test_serials_near_an_issued_one_are_never_answered_for_it(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    """Zero, the negated serial, one 2^160 above (21+ octets, same low bits) and a
    non-minimal spelling are other serials or not DER: never the issued one's answer."""
    from signer.issuers import issuer_from_certificate

    hashes_of = issuer_from_certificate("x", p256_issuer.ca.ca_cert).cert_id_hashes["sha1"]
    serial = good_cert.serial_number
    for other in (0, -serial, serial + 2**160):
        der = cert_id_request(SHA1_OID, *hashes_of, other)
        _assert_error(httpx.get(get_url(responder.url, der)), UNAUTHORIZED)
    minimal = serial.to_bytes(serial.bit_length() // 8 + 1, "big")
    der = cert_id_request(SHA1_OID, *hashes_of, serial, serial_content=b"\x00" + minimal)
    _assert_error(post(responder.url, der), MALFORMED_REQUEST)


def test_rsa_issuer_signing_itself(responder, rsa_issuer):  # type: ignore[no-untyped-def]
    cert = rsa_issuer.ca.issue_leaf("rsa.test")
    assert responder.record(cert, der=True).status_code == 201
    for alg in ("sha1", "sha256"):
        der = build_request(cert, rsa_issuer.ca.ca_cert, alg=alg)
        resp = httpx.get(get_url(responder.url, der))
        check_response(resp.content, issuer=rsa_issuer, serial=cert.serial_number, alg=alg)


def test_caching_headers_and_304(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    url = get_url(responder.url, build_request(good_cert, p256_issuer.ca.ca_cert))
    resp = httpx.get(url)
    parsed = ocsp.load_der_ocsp_response(resp.content)
    cache_control = resp.headers["cache-control"]
    parts = [p.strip() for p in cache_control.split(",")]
    assert parts[1:] == ["public", "no-transform", "must-revalidate"], cache_control
    max_age = int(parts[0].removeprefix("max-age="))
    date = parsedate_to_datetime(resp.headers["date"])
    assert 0 < max_age <= (parsed.next_update_utc - date).total_seconds()
    assert resp.headers["etag"] == '"' + hashlib.sha256(resp.content).hexdigest() + '"'
    assert parsedate_to_datetime(resp.headers["last-modified"]) == parsed.this_update_utc
    assert parsedate_to_datetime(resp.headers["expires"]) == parsed.next_update_utc
    again = httpx.get(url, headers={"If-None-Match": resp.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    for name in ("etag", "last-modified", "expires", "cache-control"):
        assert again.headers[name] == resp.headers[name]
    other = httpx.get(url, headers={"If-None-Match": '"nope"'})
    assert other.status_code == 200 and other.content == resp.content
    # a POST is never answered 304 (RFC 9110 15.4.5: GET and HEAD only)
    posted = httpx.post(
        responder.url + "/",
        content=build_request(good_cert, p256_issuer.ca.ca_cert),
        headers={"Content-Type": "application/ocsp-request", "If-None-Match": resp.headers["etag"]},
    )
    assert posted.status_code == 200 and posted.content == resp.content


def _assert_error(resp: httpx.Response, body: bytes) -> None:
    assert resp.status_code == 200
    assert resp.content == body
    assert resp.headers["content-type"] == OCSP_TYPE
    assert resp.headers["cache-control"] == "no-cache"
    assert ocsp.load_der_ocsp_response(resp.content).response_status != (
        ocsp.OCSPResponseStatus.SUCCESSFUL
    )


def test_unknown_issuer_unauthorized(responder, good_cert):  # type: ignore[no-untyped-def]
    from signer.demo_ca import create_ca

    stranger = create_ca("p256", "Stranger")
    der = build_request(None, stranger.ca_cert, serial=good_cert.serial_number)
    _assert_error(httpx.get(get_url(responder.url, der)), UNAUTHORIZED)
    _assert_error(post(responder.url, der), UNAUTHORIZED)


def test_unassigned_serial_never_good(responder, p256_issuer):  # type: ignore[no-untyped-def]
    for alg in ("sha1", "sha256"):
        der = build_request(None, p256_issuer.ca.ca_cert, serial=secrets.randbits(120), alg=alg)
        _assert_error(httpx.get(get_url(responder.url, der)), UNAUTHORIZED)


def test_malformed_requests(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    der = build_request(good_cert, p256_issuer.ca.ca_cert)
    two = _two_certid_request(good_cert, p256_issuer)
    no_certid = bytes.fromhex("3004300230 00".replace(" ", ""))
    cases = {
        "trailing": der + b"\x00",
        "truncated": der[:-3],
        "garbage": b"hello world",
        "no certid": no_certid,
        "two certids": two,
    }
    for name, body in cases.items():
        _assert_error(post(responder.url, body), MALFORMED_REQUEST)
        _assert_error(httpx.get(get_url(responder.url, body)), MALFORMED_REQUEST), name
    _assert_error(post(responder.url, b""), MALFORMED_REQUEST)
    for path in ("/!!!!", "/MEUw%ZZ", "/M", "/" + "A" * 5):
        _assert_error(httpx.get(responder.url + path), MALFORMED_REQUEST)


def test_critical_extensions_not_understood_are_malformed(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    """RFC 6960 4.4: a critical extension we do not understand must not be ignored (the
    answer was the pre-signed good, as if the extension were absent)."""
    ca = p256_issuer.ca.ca_cert
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")
    refused = [
        critical_extension_request(good_cert, ca, unknown),
        with_single_request_extension(build_request(good_cert, ca), critical=True),
        # RFC 5280 4.2: an extension appears once (it was accepted here)
        with_single_request_extension(build_request(good_cert, ca), critical=False, times=2),
    ]
    for der in refused:
        _assert_error(post(responder.url, der), MALFORMED_REQUEST)
        _assert_error(httpx.get(get_url(responder.url, der)), MALFORMED_REQUEST)
    accepted = [
        critical_extension_request(good_cert, ca, unknown, critical=False),
        with_single_request_extension(build_request(good_cert, ca), critical=False),
    ]
    for der in accepted:
        check_response(
            post(responder.url, der).content, issuer=p256_issuer, serial=good_cert.serial_number
        )


def _two_certid_request(cert, issuer):  # type: ignore[no-untyped-def]
    """Two Requests in one requestList: built by hand (cryptography builds one)."""
    one = build_request(cert, issuer.ca.ca_cert)
    # OCSPRequest { TBSRequest { requestList { Request } } }: duplicate the Request
    from signer.der import children, read_tlv

    _, c0, c1 = read_tlv(one, 0, len(one))
    _, _, t0, t1 = children(one, c0, c1)[0]  # TBSRequest
    _, _, l0, l1 = children(one, t0, t1)[0]  # requestList
    _, start, _, end = children(one, l0, l1)[0]  # the one Request
    item = one[start:end]

    def wrap(tag: int, body: bytes) -> bytes:
        n = len(body)
        length = (
            bytes([n])
            if n < 128
            else bytes([0x81, n])
            if n < 256
            else bytes([0x82]) + n.to_bytes(2, "big")
        )
        return bytes([tag]) + length + body

    return wrap(0x30, wrap(0x30, wrap(0x30, item + item)))


def test_nonce_rules(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    # live path (SHA-512 CertID not cached yet for a fresh cert): nonce echoed
    cert = p256_issuer.ca.issue_leaf("nonce.test")
    assert responder.record(cert).status_code == 201
    nonce = secrets.token_bytes(32)
    der = build_request(cert, p256_issuer.ca.ca_cert, alg="sha512", nonce=nonce)
    resp = post(responder.url, der)
    check_response(
        resp.content, issuer=p256_issuer, serial=cert.serial_number, alg="sha512", nonce=nonce
    )
    # pre-signed path: served without a nonce (RFC 5019 allows it)
    der = build_request(good_cert, p256_issuer.ca.ca_cert, nonce=secrets.token_bytes(16))
    resp = post(responder.url, der)
    check_response(resp.content, issuer=p256_issuer, serial=good_cert.serial_number, nonce=None)
    # RFC 9654: empty and over-long nonces are malformed
    for bad in (b"", secrets.token_bytes(129)):
        der = build_request(good_cert, p256_issuer.ca.ca_cert, nonce=bad)
        _assert_error(post(responder.url, der), MALFORMED_REQUEST)


def test_unwrapped_nonce_is_echoed_as_sent(responder, p256_issuer, tmp_path):  # type: ignore[no-untyped-def]
    """A nonce sent as the bare extnValue (the RFC 2560 reading RFC 8954 discusses; what
    BouncyCastle's ``new Extension(id_pkix_ocsp_nonce, false, new DEROctetString(n))``
    sends) was echoed wrapped in a second OCTET STRING: such a client, and ``openssl
    ocsp``, compare extnValues and saw a nonce mismatch."""
    from signer.der import encode_tlv

    cert = p256_issuer.ca.issue_leaf("bare-nonce.test")
    assert responder.record(cert).status_code == 201
    raw = secrets.token_bytes(15) + b"\x00"  # never a complete OCTET STRING TLV
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, p256_issuer.ca.ca_cert, hashes.SHA512())  # signed live
        .add_extension(x509.UnrecognizedExtension(x509.oid.OCSPExtensionOID.NONCE, raw), False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    resp = post(responder.url, request)
    assert resp.status_code == 200
    nonce_oid = encode_tlv(0x06, bytes.fromhex("2b0601050507300102"))
    assert nonce_oid + encode_tlv(0x04, raw) in resp.content
    (tmp_path / "req.der").write_bytes(request)
    (tmp_path / "resp.der").write_bytes(resp.content)
    result = subprocess.run(
        [
            "openssl",
            "ocsp",
            "-reqin",
            str(tmp_path / "req.der"),
            "-respin",
            str(tmp_path / "resp.der"),
            "-issuer",
            str(p256_issuer.ca_pem),
            "-CAfile",
            str(p256_issuer.chain_pem),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Response verify OK" in result.stdout + result.stderr, result.stderr
    assert "nonce" not in (result.stdout + result.stderr).lower(), result.stderr


def test_post_body_limit(responder):  # type: ignore[no-untyped-def]
    resp = httpx.post(
        responder.url, content=b"0" * 20_000, headers={"Content-Type": "application/ocsp-request"}
    )
    assert resp.status_code == 413

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b"0" * 1024

    resp = httpx.post(
        responder.url, content=chunks(), headers={"Content-Type": "application/ocsp-request"}
    )
    assert resp.status_code == 413


def test_post_wrong_content_type(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    der = build_request(good_cert, p256_issuer.ca.ca_cert)
    for other in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        resp = httpx.post(responder.url, content=der, headers={"Content-Type": other})
        assert resp.status_code == 415, other
        assert resp.headers["cache-control"] == "no-cache"


def test_post_content_type_absent_or_with_parameters_is_read(responder, p256_issuer, good_cert):  # type: ignore[no-untyped-def]
    """README: no Content-Type reads as application/ocsp-request, matched without case
    or parameters; the same DER by GET gets the same bytes."""
    der = build_request(good_cert, p256_issuer.ca.ca_cert)
    by_get = httpx.get(get_url(responder.url, der)).content
    for headers in ({}, {"Content-Type": "Application/OCSP-Request; charset=binary"}):
        resp = httpx.post(responder.url, content=der, headers=headers)
        assert resp.status_code == 200, headers
        assert resp.content == by_get
    check_response(by_get, issuer=p256_issuer, serial=good_cert.serial_number)


def test_revoked_answer(responder, p256_issuer):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("revoke.test")
    assert responder.record(cert).status_code == 201
    url = get_url(responder.url, build_request(cert, p256_issuer.ca.ca_cert))
    check_response(httpx.get(url).content, issuer=p256_issuer, serial=cert.serial_number)
    r = responder.revoke("p256", cert.serial_number, "keyCompromise")
    assert r.status_code == 201, r.text
    checked = check_response(
        httpx.get(url).content, issuer=p256_issuer, serial=cert.serial_number, expect="revoked"
    )
    assert checked.response.revocation_reason is not None
    assert checked.response.revocation_reason.name == "key_compromise"
    assert "keyCompromise" in checked.openssl_text


def test_on_demand_signing_and_write_back(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    """A known serial whose response row is missing is signed on demand and stored."""
    from responder.store import serial_key

    cert = p256_issuer.ca.issue_leaf("ondemand.test")
    assert responder.record(cert).status_code == 201
    key = serial_key(cert.serial_number)
    sql_sync(module_database, "DELETE FROM responses WHERE serial = $1", key)
    der = build_request(cert, p256_issuer.ca.ca_cert)
    resp = post(responder.url, der)
    check_response(resp.content, issuer=p256_issuer, serial=cert.serial_number)
    # written back after the answer (batched): give it a moment
    deadline = time.monotonic() + 5
    while True:
        rows = sql_sync(module_database, "SELECT der FROM responses WHERE serial = $1", key)
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(rows) == 1
    assert rows[0]["der"] == resp.content


def test_stale_row_is_not_served(responder, p256_issuer, module_database):  # type: ignore[no-untyped-def]
    """A stored response past its renewal point is re-signed, never served as is."""
    from responder.store import serial_key

    cert = p256_issuer.ca.issue_leaf("stale.test")
    assert responder.record(cert).status_code == 201
    key = serial_key(cert.serial_number)
    sql_sync(
        module_database,
        "UPDATE responses SET this_update = now() - interval '11 days', "
        "next_update = now() - interval '1 day', der = '\\x3000'::bytea WHERE serial = $1",
        key,
    )
    resp = post(responder.url, build_request(cert, p256_issuer.ca.ca_cert))
    assert resp.content != b"\x30\x00"
    check_response(resp.content, issuer=p256_issuer, serial=cert.serial_number)
    deadline = time.monotonic() + 5  # written back after the answer (batched)
    while True:
        row = sql_sync(
            module_database,
            "SELECT next_update > now() AS fresh FROM responses WHERE serial = $1",
            key,
        )
        if row[0]["fresh"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert row[0]["fresh"]


def test_health_on_ocsp_port(responder):  # type: ignore[no-untyped-def]
    health = httpx.get(responder.url + "/healthz")
    assert health.status_code == 200 and health.text == "ok\n"
    ready = httpx.get(responder.url + "/readyz")
    assert ready.status_code == 200 and ready.text.startswith("ready")
    # the admin API is not on the public port
    resp = httpx.post(responder.url + "/v1/certificates", content=b"x")
    assert resp.status_code == 404


def test_idle_keep_alive_closes_after_the_configured_timeout(  # type: ignore[no-untyped-def]
    responder, p256_issuer, good_cert
) -> None:
    """``ocsp_keep_alive_timeout = "2s"`` (the fixture), not the 5 s default, on both servers:
    the connection stays open after an answer, then the server closes it."""
    der = build_request(good_cert, p256_issuer.ca.ca_cert)
    path = base64.b64encode(der).decode()
    with socket.create_connection(("127.0.0.1", responder.port), timeout=5) as sock:
        sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: ocsp.test\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        opened = time.monotonic()
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # kept alive: nothing more, no close yet
            while sock.recv(65536):
                pass
        sock.settimeout(4.0)
        while sock.recv(65536):  # rest of the body, then the server's close (b"")
            pass
        assert time.monotonic() - opened < 4.5
