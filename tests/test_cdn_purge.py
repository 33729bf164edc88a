"""The CDN purge hook: which URLs a revocation purges, configuration errors, and a CDN
that does not answer (a real refused connection) costing the revoker a bounded wait."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from cryptography.x509 import ocsp

from responder.cdn_purge import CdnPurger, purge_calls, request_der
from responder.config import CdnPurgeConfig, ConfigError, load_config
from signer.demo_ca import DemoCA
from signer.issuers import Issuer, issuer_from_certificate
from tests.support import free_port


@pytest.fixture
def issuer(demo_ca: DemoCA) -> Issuer:
    return issuer_from_certificate("r1", demo_ca.ca_cert)


def test_templates_cover_get_forms_and_post_key(issuer: Issuer) -> None:
    serial = 0x1234ABCD
    targets = [
        CdnPurgeConfig("http://cdn/ocsp/{get_path}", "PURGE"),
        CdnPurgeConfig("http://cdn/ocsp/{get_path_raw}", "PURGE"),
        CdnPurgeConfig("http://cdn/post/{post_key}"),
        CdnPurgeConfig("http://cdn/tag/{issuer}-{serial}", "POST", {"X-Key": "k"}),
    ]
    calls = purge_calls(targets, issuer, serial)
    expected: set[tuple[str, str]] = {("POST", "http://cdn/tag/r1-1234abcd")}
    for algorithm in ("sha1", "sha256"):
        der = request_der(issuer, serial, algorithm)
        parsed = ocsp.load_der_ocsp_request(der)
        assert parsed.serial_number == serial and parsed.hash_algorithm.name == algorithm
        b64 = base64.b64encode(der).decode()
        encoded = quote(b64, safe="")
        assert "/" not in encoded and "+" not in encoded and "=" not in encoded
        assert unquote(encoded) == b64
        expected |= {
            ("PURGE", f"http://cdn/ocsp/{encoded}"),
            ("PURGE", f"http://cdn/ocsp/{b64}"),  # the same when b64 has no + / =
            ("GET", f"http://cdn/post/{hashlib.sha256(der).hexdigest()}"),
        }
    assert {(c.method, c.url) for c in calls} == expected
    assert len(calls) == len(expected)  # no duplicate calls
    assert next(c for c in calls if c.method == "POST").headers == {"X-Key": "k"}


def test_unreachable_cdn_is_bounded_and_reported(issuer: Issuer) -> None:
    dead = f"http://127.0.0.1:{free_port()}/{{get_path}}"  # nothing listens: refused
    purger = CdnPurger([CdnPurgeConfig(dead)], attempts=3, timeout=1.0, settle_delay=0.0)

    clients: list[object] = []

    async def go() -> str:
        result = await purger.purge(issuer, 42)
        await purger.drain()
        clients.append(await purger.client())
        assert await purger.purge(issuer, 43) == "failed"
        await purger.drain()
        # one client for every round (each is a CA bundle load): not one per round
        assert await purger.client() is clients[0]
        await purger.aclose()
        return result

    start = time.monotonic()
    assert asyncio.run(go()) == "failed"
    assert time.monotonic() - start < 10


def test_purge_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    for body, message in (
        ('[[cdn_purge]]\nurl = "http://x/{nope}"\n', "bad template"),
        ('[[cdn_purge]]\nurl = "ftp://x/{get_path}"\n', "http:// or https://"),
        ('[[cdn_purge]]\nmethod = "PURGE"\n', "'url'"),
        ('refresher_spread = "3d"\n', "shorter than refresh_margin"),
        ("refresher_batch_size = 0\n", "at least 1"),
    ):
        path.write_text(body)
        with pytest.raises(ConfigError, match=message):
            load_config(path, {})
    path.write_text(
        'refresher = false\nexpired_retention = "30d"\n'
        '[[cdn_purge]]\nurl = "http://edge/{get_path}"\nheaders = { "X-OCSP-Purge" = "1" }\n'
    )
    cfg = load_config(path, {})
    assert cfg.refresher is False and cfg.expired_retention.days == 30
    assert cfg.cdn_purge == [CdnPurgeConfig("http://edge/{get_path}", "GET", {"X-OCSP-Purge": "1"})]
