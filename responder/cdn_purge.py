"""The CDN purge hook: after a revocation commits, tell the CDN to forget the old answer.

A CDN caches OCSP GETs by URL. For one serial the URLs relying parties use are the
url-encoded and the raw base64 of the DER OCSPRequest (RFC 6960 A.1 / RFC 5019), for a
SHA-1 CertID (what nearly every client sends) and a SHA-256 one (RFC 9919 asks new
clients for it), without a nonce (a request with a nonce is unique and never worth
purging). Each configured ``cdn_purge`` template is expanded with:

``{get_path}``      url-encoded base64 of the request (``/`` -> ``%2F``, ``+`` -> ``%2B``, ``=`` -> ``%3D``)
``{get_path_raw}``  the same base64 unencoded
``{post_key}``      hex SHA-256 of the DER request body: the POST cache key for a CDN that
                    caches POST keyed on the body (most do not; nginx-cdn.conf does not)
``{serial}``        serial in hex; ``{issuer}`` the issuer's configured name

A template that uses none of the request placeholders is called once per revocation.
Calls run after the commit; each is retried (``cdn_purge_attempts``) with backoff. The
revocation's answer waits for the first round at most ``cdn_purge_timeout``; the rest
finishes in the background. A second round runs ``SETTLE_DELAY`` later, after every
responder instance has surely dropped its in-process copy (LISTEN/NOTIFY, < 1 s): a purge
that refreshes the CDN entry through an instance that had not yet heard of the revocation
would otherwise put the old answer back. Failures are logged and counted
(``ocsp_cdn_purges_total{result="failed"}``), never raised to the revoker.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from responder import metrics
from responder.config import CdnPurgeConfig
from signer.issuers import Issuer

log = logging.getLogger(__name__)

#: CertID hash algorithms whose GET URLs are purged
PURGED_ALGORITHMS = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}
#: seconds after the commit for the second round (beyond the 1 s invalidation bound)
SETTLE_DELAY = 1.5
_REQUEST_FIELDS = ("{get_path}", "{get_path_raw}", "{post_key}")


@dataclass(frozen=True, slots=True)
class PurgeCall:
    method: str
    url: str
    headers: dict[str, str]


def request_der(issuer: Issuer, serial: int, algorithm: str) -> bytes:
    """The canonical nonce-less one-CertID OCSPRequest a client sends for this serial."""
    name_hash, key_hash = issuer.cert_id_hashes[algorithm]
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, key_hash, serial, PURGED_ALGORITHMS[algorithm]()
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


def purge_calls(targets: list[CdnPurgeConfig], issuer: Issuer, serial: int) -> list[PurgeCall]:
    """Every distinct call the templates expand to for one serial."""
    calls: dict[tuple[str, str], PurgeCall] = {}
    for target in targets:
        per_request = any(f in target.url for f in _REQUEST_FIELDS)
        for algorithm in PURGED_ALGORITHMS if per_request else ("sha1",):
            der = request_der(issuer, serial, algorithm)
            b64 = base64.b64encode(der).decode()
            url = target.url.format(
                get_path=quote(b64, safe=""),
                get_path_raw=b64,
                post_key=hashlib.sha256(der).hexdigest(),
                serial=format(serial, "x"),
                issuer=quote(issuer.name, safe=""),
            )
            calls[(target.method, url)] = PurgeCall(target.method, url, target.headers)
    return list(calls.values())


class CdnPurger:
    def __init__(
        self,
        targets: list[CdnPurgeConfig],
        *,
        attempts: int = 3,
        timeout: float = 2.0,
        settle_delay: float = SETTLE_DELAY,
    ) -> None:
        self.targets = targets
        self.attempts = attempts
        self.timeout = timeout
        self.settle_delay = settle_delay
        self._background: set[asyncio.Future[Any]] = set()
        self._client: httpx.AsyncClient | None = None
        self._client_lock = asyncio.Lock()

    async def client(self) -> httpx.AsyncClient:
        """The one HTTP client of this purger, built on first use, in a thread.

        Building one loads the CA bundle (25-90 ms of CPU here): a client per round (two
        per revocation) held the event loop, which also answers OCSP, that long each.
        """
        async with self._client_lock:
            if self._client is None:
                self._client = await asyncio.to_thread(httpx.AsyncClient, timeout=self.timeout)
            return self._client

    async def _call(self, client: httpx.AsyncClient, call: PurgeCall) -> bool:
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            try:
                # the whole call, not only each read: a CDN that drips its answer never
                # tripped httpx's timeouts, and the round (and `revoke`) never ended
                response = await asyncio.wait_for(
                    client.request(call.method, call.url, headers=call.headers), self.timeout
                )
                if response.status_code < 400:
                    metrics.cdn_purges_total.labels("ok").inc()
                    return True
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except TimeoutError:
                problem = f"no complete answer within {self.timeout:g}s"
            if attempt < self.attempts:
                metrics.cdn_purges_total.labels("retried").inc()
                await asyncio.sleep(delay)
                delay *= 2
        metrics.cdn_purges_total.labels("failed").inc()
        log.error(
            "CDN purge failed after %d attempts: %s %s: %s",
            self.attempts,
            call.method,
            call.url,
            problem,
        )
        return False

    async def _round(self, calls: list[PurgeCall]) -> bool:
        client = await self.client()
        results = await asyncio.gather(*(self._call(client, c) for c in calls))
        return all(results)

    async def _settle(self, calls: list[PurgeCall]) -> None:
        await asyncio.sleep(self.settle_delay)
        await self._round(calls)

    async def purge(self, issuer: Issuer, serial: int, *, wait_settle: bool = False) -> str:
        """Run the purge for one revoked serial: "purged", "pending" (still running after
        ``timeout``: continues in the background), "failed", or "none" (no hook)."""
        if not self.targets:
            return "none"
        calls = purge_calls(self.targets, issuer, serial)
        first = asyncio.ensure_future(self._round(calls))
        settle = asyncio.ensure_future(self._settle(calls))
        self._keep(settle)
        if wait_settle:
            await settle
        try:
            done = await asyncio.wait_for(asyncio.shield(first), timeout=self.timeout)
        except TimeoutError:
            self._keep(first)
            return "pending"
        return "purged" if done else "failed"

    def _keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a reference so a background round is not garbage-collected mid-flight."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background rounds (the CLI calls this before exiting)."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def aclose(self) -> None:
        """At shutdown: give background rounds the time of one more round (a revocation
        just made gets its settle round), cancel what is left, close the HTTP client.

        Waiting for them all held SIGTERM for ever against a CDN that drips its answer
        (httpx's timeout bounds each read, not a call), or attempts x timeout against a
        slow one; the purge is best effort, the cache's max-age bounds what it misses."""
        if self._background:
            grace = self.settle_delay + self.timeout
            _, pending = await asyncio.wait(list(self._background), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.warning(
                    "CDN purge: %d background rounds cancelled at shutdown (still running "
                    "after %.1fs); the CDN keeps those answers until their max-age",
                    len(pending),
                    grace,
                )
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
