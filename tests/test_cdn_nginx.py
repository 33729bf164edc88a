"""Through a real caching proxy: nginx configured by the shipped docs/deploy/nginx-cdn.conf
in front of `ocsp-responder serve`. Shows what a CDN edge does with our headers: a repeated
GET is a cache HIT, an `unauthorized` is never cached (a late recording is seen at once),
and a revocation's purge hook refreshes the cached entry so the next client sees it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from responder.protocol import UNAUTHORIZED
from signer.demo_ca import random_serial
from tests.nginx_edge import NginxEdge
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    free_port,
    get_url,
    write_config,
)


@pytest.fixture(scope="module")
def edge_and_responder(
    module_database: str, p256_issuer: IssuerFiles, workdir: Path
) -> Iterator[tuple[NginxEdge, ResponderProcess]]:
    edge_port = free_port()
    purge = "\n".join(
        f'[[cdn_purge]]\nurl = "http://127.0.0.1:{edge_port}/{{{field}}}"\n'
        'headers = { "X-OCSP-Purge" = "1" }'
        for field in ("get_path", "get_path_raw")
    )
    # top-level keys first: the [[cdn_purge]] tables go after them, before [[issuers]].
    # The revocation's answer waits cdn_purge_timeout for the purge round (the edge asks
    # the responder again): the 2 s default is a loaded CI machine's latency, not a CDN's.
    top = 'max_age = "1h"\ncdn_purge_timeout = "10s"\n'
    responder = write_config(
        workdir / "cdn", module_database, [p256_issuer], extra=top + purge
    ).start()
    edge = NginxEdge(edge_port, f"127.0.0.1:{responder.port}").start()
    try:
        yield edge, responder
    finally:
        edge.stop()
        responder.stop()


def fetch(url: str) -> httpx.Response:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/ocsp-response"
    return response


def test_repeated_get_is_served_from_cache(edge_and_responder, p256_issuer):  # type: ignore[no-untyped-def]
    edge, responder = edge_and_responder
    cert = p256_issuer.ca.issue_leaf("cached.cdn.test")
    assert responder.record(cert).status_code == 201
    url = get_url(edge.url, build_request(cert, p256_issuer.ca.ca_cert))
    first = fetch(url)
    assert first.headers["x-cache-status"] == "MISS"
    max_age = int(first.headers["cache-control"].split(",")[0].removeprefix("max-age="))
    assert 3000 < max_age <= 3600  # max_age = 1h, well below nextUpdate
    second = fetch(url)
    assert second.headers["x-cache-status"] == "HIT"
    assert second.content == first.content
    check_response(second.content, issuer=p256_issuer, serial=cert.serial_number)
    head = httpx.head(url, timeout=10)
    assert head.headers["x-cache-status"] == "HIT"  # HEAD shares the GET entry


def test_unauthorized_is_never_cached(edge_and_responder, p256_issuer):  # type: ignore[no-untyped-def]
    edge, responder = edge_and_responder
    cert = p256_issuer.ca.issue_leaf("late.cdn.test", serial=random_serial())
    url = get_url(edge.url, build_request(cert, p256_issuer.ca.ca_cert))
    for _ in range(2):
        answer = fetch(url)
        assert answer.content == UNAUTHORIZED
        assert answer.headers["cache-control"] == "no-cache"
        assert answer.headers["x-cache-status"] == "MISS"  # looked up, not stored
    assert responder.record(cert).status_code == 201
    # the very next client through the edge gets the signed answer, not a cached refusal
    check_response(fetch(url).content, issuer=p256_issuer, serial=cert.serial_number)
    assert fetch(url).headers["x-cache-status"] == "HIT"


def test_revocation_purge_reaches_the_next_client(edge_and_responder, p256_issuer):  # type: ignore[no-untyped-def]
    edge, responder = edge_and_responder
    cert = p256_issuer.ca.issue_leaf("revoked.cdn.test")
    assert responder.record(cert).status_code == 201
    der = build_request(cert, p256_issuer.ca.ca_cert)
    # two cache keys for one request (one, when its base64 has no '+', '/' or '=')
    urls = sorted({get_url(edge.url, der, style=style) for style in ("quoted", "raw")})
    for url in urls:
        fetch(url)
        cached = fetch(url)
        assert cached.headers["x-cache-status"] == "HIT"
        check_response(cached.content, issuer=p256_issuer, serial=cert.serial_number)
    revoked = responder.revoke(p256_issuer.name, cert.serial_number)
    assert revoked.status_code == 201, revoked.text
    assert revoked.json()["cdn_purge"] == "purged"
    for url in urls:
        after = fetch(url)
        # still served from the edge's cache, but the purge replaced the entry
        assert after.headers["x-cache-status"] == "HIT"
        check_response(
            after.content, issuer=p256_issuer, serial=cert.serial_number, expect="revoked"
        )


def test_purge_header_from_outside_is_ignored_and_post_not_cached(edge_and_responder, p256_issuer):  # type: ignore[no-untyped-def]
    edge, responder = edge_and_responder
    cert = p256_issuer.ca.issue_leaf("post.cdn.test")
    assert responder.record(cert).status_code == 201
    der = build_request(cert, p256_issuer.ca.ca_cert)
    for _ in range(2):
        post = httpx.post(
            edge.url + "/",
            content=der,
            headers={"content-type": "application/ocsp-request"},
            timeout=10,
        )
        assert post.status_code == 200
        assert post.headers.get("x-cache-status") != "HIT"
        check_response(post.content, issuer=p256_issuer, serial=cert.serial_number)
    url = get_url(edge.url, der)
    fetch(url)
    # an empty purge header is not a purge: the cached entry answers
    assert httpx.get(url, headers={"X-OCSP-Purge": ""}).headers["x-cache-status"] == "HIT"


def test_edge_drops_idle_upstream_connections_before_the_responder_does() -> None:
    """nginx keeps idle upstream connections 60 s by default, the responder 5 s: a request
    nginx sends on one just as the responder closes it is lost (a POST, not retried, is a
    502). The shipped config's upstream keepalive_timeout must be below the default
    ocsp_keep_alive_timeout."""
    from responder.config import Config
    from tests.nginx_edge import SHIPPED_CONFIG

    upstream = SHIPPED_CONFIG.read_text().split("upstream ocsp_responders {", 1)[1]
    block = upstream.split("}", 1)[0]
    directives = [line.split("#", 1)[0].split() for line in block.splitlines()]
    [seconds] = [d[1].rstrip(";") for d in directives if d and d[0] == "keepalive_timeout"]
    assert seconds.endswith("s")
    responder_default = Config.__dataclass_fields__["ocsp_keep_alive_timeout"].default
    assert float(seconds[:-1]) < responder_default.total_seconds()
