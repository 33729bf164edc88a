"""The CDN purge hook: which URLs a revocation purges, configuration errors, and a CDN
that does not answer (a real refused connection) costing the revoker a bounded wait."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from cryptography.x509 import ocsp

from responder.cdn_purge import CdnPurger, purge_calls, request_der
from responder.config import CdnPurgeConfig, ConfigError, load_config
from signer.demo_ca import DemoCA
from signer.issuers import Issuer, issuer_from_certificate
from tests.support import IssuerFiles, free_port, write_config


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
        # 0 was accepted: httpx then times out at once, so every purge failed
        ('cdn_purge_timeout = "0s"\n', "cdn_purge_timeout: must be more than 0"),
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


class DrippingCdn:
    """A CDN endpoint that answers every purge a byte at a time, each well within the
    read timeout, and never finishes: httpx's timeouts bound each read, not the call."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.requests += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not self._stop.wait(0.3):
                    conn.sendall(b".")
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join()
        self.sock.close()


def test_serve_stops_promptly_while_a_purge_drips(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """At shutdown serve waited for every background purge round to end: against a CDN
    that drips its answer (or a slow one with many attempts) SIGTERM never ended it.
    Background rounds now get a bounded grace, then are cancelled."""
    cdn = DrippingCdn()
    proc = write_config(
        tmp_path,
        database,
        [p256_issuer],
        # 10 attempts of 1 s: the rounds outlast shutdown's grace (settle delay + one
        # timeout, 2.5 s) however late SIGTERM comes; with 3 they could end within it
        extra=f'cdn_purge_timeout = "1s"\ncdn_purge_attempts = 10\n'
        f'[[cdn_purge]]\nurl = "http://127.0.0.1:{cdn.port}/{{serial}}"\n',
    ).start()
    try:
        cert = p256_issuer.ca.issue_leaf("drip.cdn.test")
        assert proc.record(cert).status_code == 201
        revoked = proc.revoke(p256_issuer.name, cert.serial_number)
        assert revoked.status_code in (200, 201), revoked.text
        assert revoked.json()["cdn_purge"] == "pending"  # bounded for the caller already
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        try:
            proc.proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not stop within 15 s of SIGTERM: it waited for the purge")
        assert proc.proc.returncode == 0, proc.log()
        assert time.monotonic() - start < 15
        assert "CDN purge" in proc.log() and "cancelled at shutdown" in proc.log()
    finally:
        proc.stop(signal.SIGKILL)
        cdn.close()


def test_a_dripping_cdn_fails_the_purge_within_its_attempts(issuer: Issuer) -> None:
    """httpx's timeout bounds each read: a CDN sending a byte every 0.3 s held each call,
    so the round, `ocsp-responder revoke` (which waits for it) and shutdown, for ever."""
    cdn = DrippingCdn()
    purger = CdnPurger(
        [CdnPurgeConfig(f"http://127.0.0.1:{cdn.port}/{{serial}}")],
        attempts=2,
        timeout=1.0,
        settle_delay=0.0,
    )

    async def go() -> str:
        try:
            result = await purger.purge(issuer, 42)
            await asyncio.wait_for(purger.drain(), 10)  # was: never
            return result
        finally:
            await purger.aclose()

    try:
        assert asyncio.run(go()) in ("failed", "pending")
        assert cdn.requests >= 2  # both attempts were made (and bounded)
    finally:
        cdn.close()
