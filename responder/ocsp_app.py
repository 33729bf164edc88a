"""The public OCSP endpoint as a lean ASGI app (no framework routing on the hot path).

GET  {prefix}/{url-encoded base64 of the DER request}   (HEAD: same headers, no body)
POST {prefix}  with Content-Type application/ocsp-request
Anything else: 405. The path is read raw from the ASGI scope: no slash merging, no
redirects. Success answers carry RFC 5019 caching headers; every other answer is an
unsigned OCSP error with ``Cache-Control: no-cache`` so that no cache holds it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter, time
from typing import Any

from responder.answer_stats import AnswerStats
from responder.protocol import (
    INTERNAL_ERROR,
    MALFORMED_REQUEST,
    MAX_REQUEST_BYTES,
    TRY_LATER,
    UNAUTHORIZED,
    CertIdRequest,
    MalformedRequest,
    ParsedRequests,
    UnsupportedHashAlgorithm,
)
from responder.request_log import log_answer, next_request_id
from responder.response_cache import http_date
from responder.sources import (
    IssuerFilter,
    Overloaded,
    SerialNotFound,
    Unavailable,
    UnknownIssuer,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CONTENT_TYPE = (b"content-type", b"application/ocsp-response")
NO_CACHE = (b"cache-control", b"no-cache")
#: Seconds kept between a cache's max-age and nextUpdate, so clients refetch before expiry.
NEXT_UPDATE_SLACK = 60
#: metrics/log result names of the unsigned error answers
_ERROR_RESULTS = {
    MALFORMED_REQUEST: "malformed",
    INTERNAL_ERROR: "internal_error",
    TRY_LATER: "try_later",
    UNAUTHORIZED: "unauthorized",
}
_STATUS_RESULTS = ("good", "revoked")  # indexed by CertStatus
_HEALTH_PATHS = frozenset({b"/healthz", b"/readyz"})


def _cache_control(max_age: int) -> tuple[bytes, bytes]:
    return (b"cache-control", b"max-age=%d, public, no-transform, must-revalidate" % max_age)


class OCSPApp:
    """ASGI callable serving OCSP for the configured issuers.

    The cost of an answer from the in-process cache is kept to dict lookups and one
    header list: requests are parsed once per distinct bytes (``ParsedRequests``), error
    answers and their headers are constants, and metrics are counted locally
    (``AnswerStats``, flushed by the server each second).
    """

    def __init__(
        self,
        chain: IssuerFilter,
        *,
        path_prefix: str = "",
        max_age: int = 3600,
        health: Callable[[bytes], Awaitable[tuple[int, bytes]]] | None = None,
        parsed: ParsedRequests | None = None,
        stats: AnswerStats | None = None,
    ) -> None:
        self.chain = chain
        prefix = path_prefix.rstrip("/").encode()
        self.get_prefix = prefix + b"/"
        self.post_path = prefix
        self.max_age = max_age
        self.health = health
        self.parsed = parsed or ParsedRequests()
        self.stats = stats or AnswerStats()
        self._full_cache_control = _cache_control(max_age)
        self._errors = {
            code: (
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        CONTENT_TYPE,
                        (b"content-length", str(len(code)).encode()),
                        NO_CACHE,
                    ],
                },
                {"type": "http.response.body", "body": code},
            )
            for code in _ERROR_RESULTS
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        started = perf_counter()
        try:
            await self._dispatch(scope, receive, send, started)
        except Exception:
            # Last line of defence: a bug must not become a 500 with a traceback page.
            log.exception("unhandled error serving %s", scope.get("method"))
            # if the response had already started, this fails and the connection closes
            with contextlib.suppress(Exception):
                await self._error(send, INTERNAL_ERROR, False, scope["method"], started)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        method: str = scope["method"]
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        if method == "GET" or method == "HEAD":
            head = method == "HEAD"
            if path in _HEALTH_PATHS and self.health is not None:
                status, body = await self.health(path)
                await _plain(send, status, body, head=head)
            elif path.startswith(self.get_prefix):
                try:
                    request = self.parsed.from_get_path(path, len(self.get_prefix))
                except MalformedRequest:
                    await self._error(send, MALFORMED_REQUEST, head, method, started)
                    return
                except UnsupportedHashAlgorithm:
                    await self._error(send, UNAUTHORIZED, head, method, started)
                    return
                await self._answer(scope, request, send, head, method, started)
            else:
                await _plain(send, 404, b"not found: OCSP GET requests live under the prefix\n")
        elif method == "POST":
            if path.rstrip(b"/") == self.post_path:
                await self._post(scope, receive, send, started)
            else:
                await _plain(send, 404, b"not found: OCSP POST requests go to the prefix\n")
        else:
            await _plain(send, 405, b"method not allowed\n", extra=[(b"allow", b"GET, HEAD, POST")])

    async def _post(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        content_type = b""
        length = -1
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _plain(send, 400, b"bad content-length\n")
                    return
            elif name == b"content-type":
                content_type = value.split(b";", 1)[0].strip().lower()
        if content_type not in (b"application/ocsp-request", b""):
            await _plain(send, 415, b"unsupported media type: use application/ocsp-request\n")
            return
        if length > MAX_REQUEST_BYTES:
            await _plain(send, 413, b"request too large (limit 10240 bytes)\n")
            return
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body: bytes = message.get("body", b"")
        while message.get("more_body", False):
            if len(body) > MAX_REQUEST_BYTES:
                break
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
        if len(body) > MAX_REQUEST_BYTES:
            await _plain(send, 413, b"request too large (limit 10240 bytes)\n")
            return
        try:
            request = self.parsed.from_body(body)
        except MalformedRequest:
            await self._error(send, MALFORMED_REQUEST, False, "POST", started)
            return
        except UnsupportedHashAlgorithm:
            await self._error(send, UNAUTHORIZED, False, "POST", started)
            return
        await self._answer(scope, request, send, False, "POST", started)

    async def _answer(
        self,
        scope: Scope,
        request: CertIdRequest,
        send: Send,
        head: bool,
        method: str,
        started: float,
    ) -> None:
        entry = self.chain.cached(request)
        if entry is not None:
            source = "cache"
        else:
            try:
                answer = await self.chain.response(request)
            except (UnknownIssuer, SerialNotFound):
                await self._error(send, UNAUTHORIZED, head, method, started, request.serial)
                return
            except (Overloaded, Unavailable):
                await self._error(send, TRY_LATER, head, method, started, request.serial)
                return
            except Exception:
                log.exception("lookup failed")
                await self._error(send, INTERNAL_ERROR, head, method, started, request.serial)
                return
            entry = answer.response
            source = answer.source
        der = entry.head + entry.tail if entry.tail else entry.head
        if entry.next_update - int(time()) - NEXT_UPDATE_SLACK >= self.max_age:
            cache_control = self._full_cache_control
        else:
            cache_control = _cache_control(
                max(0, entry.next_update - int(time()) - NEXT_UPDATE_SLACK)
            )
        headers = [
            CONTENT_TYPE,
            (b"content-length", b"%d" % len(der)),
            cache_control,
            (b"etag", entry.etag),
            (b"last-modified", http_date(entry.this_update)),
            (b"expires", http_date(entry.next_update)),
        ]
        result = _STATUS_RESULTS[entry.status]
        for name, value in scope["headers"]:
            if name == b"if-none-match" and _etag_matches(value, entry.etag):
                await send({"type": "http.response.start", "status": 304, "headers": headers[2:]})
                await send({"type": "http.response.body", "body": b""})
                result = "not_modified"
                break
        else:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if head else der})
        seconds = perf_counter() - started
        self.stats.count(method, result, source, seconds)
        log_answer(
            request_id=next_request_id(),
            method=method,
            result=result,
            source=source,
            serial=request.serial,
            issuer=None,
            seconds=seconds,
            error=False,
        )

    async def _error(
        self,
        send: Send,
        body: bytes,
        head: bool,
        method: str,
        started: float,
        serial: int | None = None,
    ) -> None:
        start, full = self._errors[body]
        await send(start)
        await send({"type": "http.response.body", "body": b""} if head else full)
        seconds = perf_counter() - started
        result = _ERROR_RESULTS[body]
        self.stats.count(method, result, "none", seconds)
        log_answer(
            request_id=next_request_id(),
            method=method,
            result=result,
            source="none",
            serial=serial,
            issuer=None,
            seconds=seconds,
            error=body is not UNAUTHORIZED and body is not MALFORMED_REQUEST,
        )


def _etag_matches(header: bytes, etag: bytes) -> bool:
    for candidate in header.split(b","):
        tag = candidate.strip()
        if tag == b"*" or tag == etag or tag == b"W/" + etag:
            return True
    return False


async def _plain(
    send: Send,
    status: int,
    body: bytes,
    *,
    head: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        NO_CACHE,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
