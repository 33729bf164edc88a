"""What the public OCSP endpoint answers, independent of the HTTP server carrying it.

GET  {prefix}/{url-encoded base64 of the DER request}   (HEAD: same headers, no body)
POST {prefix}  with Content-Type application/ocsp-request
Anything else: 405. The path is taken raw: no slash merging, no redirects. Success
answers carry RFC 5019 caching headers; every other answer is an unsigned OCSP error with
``Cache-Control: no-cache`` so that no cache holds it.

``OCSPEndpoint.handle`` returns a ``Reply`` at once when the answer is in memory (the
common case: no coroutine, no task) and an awaitable otherwise. Two carriers use it: the
native HTTP/1.1 listener (responder/ocsp_http.py), which ``serve`` runs, and the ASGI
adapter (responder/ocsp_app.py), for ASGI servers and the fuzz tests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from time import perf_counter, time
from typing import Any, NamedTuple

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
from responder.response_cache import ServedResponse, http_date
from responder.sources import (
    IssuerFilter,
    Overloaded,
    SerialNotFound,
    Unavailable,
    UnknownIssuer,
)

log = logging.getLogger(__name__)

Header = tuple[bytes, bytes]

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
_OCSP_REQUEST_TYPES = frozenset({b"application/ocsp-request", b""})


class Reply(NamedTuple):
    """One HTTP answer. For HEAD the body is empty and content-length is the GET's."""

    status: int
    headers: list[Header]
    body: bytes


def plain_reply(
    status: int, text: bytes, *, head: bool = False, extra: tuple[Header, ...] = ()
) -> Reply:
    """A short text answer for HTTP-level refusals (never cached)."""
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(text)),
        NO_CACHE,
        *extra,
    ]
    return Reply(status, headers, b"" if head else text)


TOO_LARGE = plain_reply(413, b"request too large (limit %d bytes)\n" % MAX_REQUEST_BYTES)
BAD_CONTENT_LENGTH = plain_reply(400, b"bad content-length\n")
_NOT_FOUND_GET = plain_reply(404, b"not found: OCSP GET requests live under the prefix\n")
_NOT_FOUND_POST = plain_reply(404, b"not found: OCSP POST requests go to the prefix\n")
_BAD_MEDIA_TYPE = plain_reply(415, b"unsupported media type: use application/ocsp-request\n")
_NOT_ALLOWED = plain_reply(405, b"method not allowed\n", extra=((b"allow", b"GET, HEAD, POST"),))


def _cache_control(max_age: int) -> Header:
    return (b"cache-control", b"max-age=%d, public, no-transform, must-revalidate" % max_age)


class OCSPEndpoint:
    """The OCSP answers for the configured issuers.

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
        self._errors: dict[tuple[bytes, bool], Reply] = {}
        for code in _ERROR_RESULTS:
            headers = [CONTENT_TYPE, (b"content-length", b"%d" % len(code)), NO_CACHE]
            self._errors[code, False] = Reply(200, headers, code)
            self._errors[code, True] = Reply(200, headers, b"")

    def handle(
        self,
        method: str,
        path: bytes,
        body: bytes = b"",
        *,
        content_type: bytes = b"",
        if_none_match: bytes | None = None,
    ) -> Reply | Coroutine[Any, Any, Reply]:
        """Answer one request: a ``Reply`` now, or a coroutine that makes it.

        ``path`` is the raw request path without the query; ``body`` the whole POST body
        (the carrier refuses bodies over MAX_REQUEST_BYTES with ``TOO_LARGE`` first);
        ``content_type`` the media type, lower-cased, without parameters."""
        started = perf_counter()
        if method == "GET" or method == "HEAD":
            head = method == "HEAD"
            if path in _HEALTH_PATHS and self.health is not None:
                return self._health(path, head)
            if path.startswith(self.get_prefix):
                try:
                    request = self.parsed.from_get_path(path, len(self.get_prefix))
                except MalformedRequest:
                    return self._error(MALFORMED_REQUEST, head, method, started)
                except UnsupportedHashAlgorithm:
                    return self._error(UNAUTHORIZED, head, method, started)
                return self._answer(request, if_none_match, head, method, started)
            return _NOT_FOUND_GET if not head else _NOT_FOUND_GET._replace(body=b"")
        if method == "POST":
            if path.rstrip(b"/") != self.post_path:
                return _NOT_FOUND_POST
            if content_type not in _OCSP_REQUEST_TYPES:
                return _BAD_MEDIA_TYPE
            if len(body) > MAX_REQUEST_BYTES:
                return TOO_LARGE
            try:
                request = self.parsed.from_body(body)
            except MalformedRequest:
                return self._error(MALFORMED_REQUEST, False, method, started)
            except UnsupportedHashAlgorithm:
                return self._error(UNAUTHORIZED, False, method, started)
            # If-None-Match is ignored: 304 answers only GET/HEAD (RFC 9110 15.4.5), and
            # the ETag belongs to the GET resource, not to the POST endpoint
            return self._answer(request, None, False, method, started)
        return _NOT_ALLOWED

    async def _health(self, path: bytes, head: bool) -> Reply:
        assert self.health is not None
        status, text = await self.health(path)
        return plain_reply(status, text, head=head)

    def _answer(
        self,
        request: CertIdRequest,
        if_none_match: bytes | None,
        head: bool,
        method: str,
        started: float,
    ) -> Reply | Coroutine[Any, Any, Reply]:
        entry = self.chain.cached(request)
        if entry is not None:
            return self._reply(entry, "cache", request, if_none_match, head, method, started)
        return self._look_up(request, if_none_match, head, method, started)

    async def _look_up(
        self,
        request: CertIdRequest,
        if_none_match: bytes | None,
        head: bool,
        method: str,
        started: float,
    ) -> Reply:
        try:
            answer = await self.chain.response(request)
        except (UnknownIssuer, SerialNotFound):
            return self._error(UNAUTHORIZED, head, method, started, request.serial)
        except (Overloaded, Unavailable):
            return self._error(TRY_LATER, head, method, started, request.serial)
        except Exception:
            log.exception("lookup failed")
            return self._error(INTERNAL_ERROR, head, method, started, request.serial)
        return self._reply(
            answer.response, answer.source, request, if_none_match, head, method, started
        )

    def _reply(
        self,
        entry: ServedResponse,
        source: str,
        request: CertIdRequest,
        if_none_match: bytes | None,
        head: bool,
        method: str,
        started: float,
    ) -> Reply:
        der = entry.head + entry.tail if entry.tail else entry.head
        now = int(time())
        # no cache (client, CDN) may keep it past nextUpdate, nor past its renewal point:
        # from then on we answer with a newer response (for a response renewed at its BR
        # 4.9.9 deadline, a full max_age after it would be a stale answer). Past the
        # renewal point (re-signing failed: the still-valid bytes) only nextUpdate counts.
        expires = entry.next_update - NEXT_UPDATE_SLACK
        left = (entry.renew_at if now < entry.renew_at < expires else expires) - now
        cache_control = (
            self._full_cache_control if left >= self.max_age else _cache_control(max(0, left))
        )
        headers = [
            CONTENT_TYPE,
            (b"content-length", b"%d" % len(der)),
            cache_control,
            (b"etag", entry.etag),
            (b"last-modified", http_date(entry.this_update)),
            (b"expires", http_date(entry.next_update)),
        ]
        if if_none_match is not None and etag_matches(if_none_match, entry.etag):
            reply = Reply(304, headers[2:], b"")
            result = "not_modified"
        else:
            reply = Reply(200, headers, b"" if head else der)
            result = _STATUS_RESULTS[entry.status]
        seconds = perf_counter() - started
        self.stats.count(method, result, source, seconds, now - entry.this_update)
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
        return reply

    def _error(
        self, body: bytes, head: bool, method: str, started: float, serial: int | None = None
    ) -> Reply:
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
        return self._errors[body, head]

    def internal_error(self, method: str, head: bool) -> Reply:
        """The answer when answering itself failed (a bug): an OCSP internalError, counted
        and logged like any other answer, never a 500 page."""
        return self._error(INTERNAL_ERROR, head, method, perf_counter())


def etag_matches(header: bytes, etag: bytes) -> bool:
    """RFC 9110 If-None-Match (weak comparison): any listed tag, or ``*``."""
    for candidate in header.split(b","):
        tag = candidate.strip()
        if tag == b"*" or tag == etag or tag == b"W/" + etag:
            return True
    return False
