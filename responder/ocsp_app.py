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
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from responder.protocol import (
    INTERNAL_ERROR,
    MALFORMED_REQUEST,
    MAX_REQUEST_BYTES,
    TRY_LATER,
    UNAUTHORIZED,
    MalformedRequest,
    UnsupportedHashAlgorithm,
    decode_get_path,
    parse_request,
)
from responder.response_cache import ServedResponse
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


class OCSPApp:
    """ASGI callable serving OCSP for the configured issuers."""

    def __init__(
        self,
        chain: IssuerFilter,
        *,
        path_prefix: str = "",
        max_age: int = 3600,
        health: Callable[[bytes], Awaitable[tuple[int, bytes]]] | None = None,
    ) -> None:
        self.chain = chain
        prefix = path_prefix.rstrip("/").encode()
        self.get_prefix = prefix + b"/"
        self.post_path = prefix
        self.max_age = max_age
        self.health = health
        self._errors = {
            code: [CONTENT_TYPE, (b"content-length", str(len(code)).encode()), NO_CACHE]
            for code in (MALFORMED_REQUEST, INTERNAL_ERROR, TRY_LATER, UNAUTHORIZED)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        try:
            await self._dispatch(scope, receive, send)
        except Exception:
            # Last line of defence: a bug must not become a 500 with a traceback page.
            log.exception("unhandled error serving %s", scope.get("method"))
            # if the response had already started, this fails and the connection closes
            with contextlib.suppress(Exception):
                await self._error(send, INTERNAL_ERROR, False)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        if method == "GET" or method == "HEAD":
            # health paths first: "/readyz" also starts with the empty prefix's "/"; base64
            # of a DER request starts with "M", so no OCSP request can look like them
            if self.health is not None and path in (b"/healthz", b"/readyz"):
                status, body = await self.health(path)
                await _plain(send, status, body, head=method == "HEAD")
            elif path.startswith(self.get_prefix):
                await self._get(scope, path[len(self.get_prefix) :], send, method == "HEAD")
            else:
                await _plain(send, 404, b"not found: OCSP GET requests live under the prefix\n")
        elif method == "POST":
            if path.rstrip(b"/") == self.post_path:
                await self._post(scope, receive, send)
            else:
                await _plain(send, 404, b"not found: OCSP POST requests go to the prefix\n")
        else:
            await _plain(send, 405, b"method not allowed\n", extra=[(b"allow", b"GET, HEAD, POST")])

    async def _get(self, scope: Scope, encoded: bytes, send: Send, head: bool) -> None:
        try:
            der = decode_get_path(encoded)
        except MalformedRequest:
            await self._error(send, MALFORMED_REQUEST, head)
            return
        await self._answer(scope, der, send, head, cacheable=True)

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_REQUEST_BYTES:
                await _plain(send, 413, b"request too large (limit 10240 bytes)\n")
                return
            if not message.get("more_body", False):
                break
        await self._answer(scope, body, send, False, cacheable=False)

    async def _answer(
        self, scope: Scope, der: bytes, send: Send, head: bool, *, cacheable: bool
    ) -> None:
        try:
            request = parse_request(der)
        except MalformedRequest:
            await self._error(send, MALFORMED_REQUEST, head)
            return
        except UnsupportedHashAlgorithm:
            await self._error(send, UNAUTHORIZED, head)
            return
        try:
            answer = await self.chain.response(request)
        except (UnknownIssuer, SerialNotFound):
            await self._error(send, UNAUTHORIZED, head)
            return
        except (Overloaded, Unavailable):
            await self._error(send, TRY_LATER, head)
            return
        except Exception:
            log.exception("lookup failed")
            await self._error(send, INTERNAL_ERROR, head)
            return
        await self._success(scope, answer.response, send, head)

    async def _success(self, scope: Scope, entry: ServedResponse, send: Send, head: bool) -> None:
        now = int(time.time())
        max_age = max(0, min(self.max_age, entry.next_update - now - NEXT_UPDATE_SLACK))
        headers = [
            CONTENT_TYPE,
            (b"content-length", str(len(entry.der)).encode()),
            (
                b"cache-control",
                b"max-age=%d, public, no-transform, must-revalidate" % max_age,
            ),
            (b"etag", entry.etag),
            (b"last-modified", entry.last_modified),
            (b"expires", entry.expires),
        ]
        for name, value in scope["headers"]:
            if name == b"if-none-match" and _etag_matches(value, entry.etag):
                await send({"type": "http.response.start", "status": 304, "headers": headers[2:]})
                await send({"type": "http.response.body", "body": b""})
                return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else entry.der})

    async def _error(self, send: Send, body: bytes, head: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._errors[body]})
        await send({"type": "http.response.body", "body": b"" if head else body})


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
