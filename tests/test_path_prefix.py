"""A responder under a path prefix (e.g. http://ocsp.example/ocsp/...)."""

from __future__ import annotations

import httpx
import pytest

from tests.support import build_request, check_response, get_url, write_config


@pytest.fixture(scope="module")
def prefixed(module_database, p256_issuer, workdir):  # type: ignore[no-untyped-def]
    proc = write_config(
        workdir / "prefixed", module_database, [p256_issuer], extra='path_prefix = "/ocsp/"'
    ).start()
    yield proc
    proc.stop()


def test_prefix_get_and_post(prefixed, p256_issuer):  # type: ignore[no-untyped-def]
    cert = p256_issuer.ca.issue_leaf("prefix.test")
    assert prefixed.record(cert).status_code == 201
    der = build_request(cert, p256_issuer.ca.ca_cert)
    for url in (
        get_url(prefixed.url, der, prefix="/ocsp"),
        get_url(prefixed.url, der, prefix="/ocsp/"),
    ):
        resp = httpx.get(url)
        assert resp.status_code == 200, url
        check_response(resp.content, issuer=p256_issuer, serial=cert.serial_number)
    for path in ("/ocsp", "/ocsp/"):
        resp = httpx.post(
            prefixed.url + path, content=der, headers={"Content-Type": "application/ocsp-request"}
        )
        check_response(resp.content, issuer=p256_issuer, serial=cert.serial_number)
    # outside the prefix: not an OCSP endpoint, and no redirect
    assert httpx.get(get_url(prefixed.url, der)).status_code == 404
    assert httpx.post(prefixed.url + "/", content=der).status_code == 404
