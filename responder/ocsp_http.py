"""The OCSP listener's HTTP/1.1 server: an asyncio protocol over httptools' parser.

Why not uvicorn on this port: under the same load on this machine, uvicorn's ASGI
machinery (a scope dict, a task and two ``send`` awaits per request) costs ~33 µs of CPU
per request, three to four times what parsing and writing cost (benchmarks/, "bare
uvicorn" vs "bare native"). The OCSP port serves three request shapes whose answers are
mostly bytes already in memory, so its server is this small protocol: the parsing is
httptools' (llhttp, the parser uvicorn and Node.js use), and an answer from the cache is
written from inside the parser callback, with no coroutine at all. The admin API, with
its many routes, stays on uvicorn + FastAPI. ``ocsp_http_server = "uvicorn"`` puts this
port back on uvicorn (responder/ocsp_app.py) should this server ever misbehave.

What it implements of HTTP/1.1 (RFC 9112), and its limits:
- keep-alive and pipelining (answers in request order; at most ``MAX_QUEUED`` parsed
  requests wait, beyond that the socket is not read);
- HTTP/1.0 (closes after the answer unless the client asked for keep-alive);
- ``Expect: 100-continue``; chunked request bodies;
- request head (request line + headers) at most ``MAX_HEAD_BYTES``: 431 and close, also
  while a header line is still arriving (httptools holds it until its end);
- request body at most MAX_REQUEST_BYTES: 413 and close, before reading it when the
  declared Content-Length is already too large;
- unparseable input: 400 and close; an ``Upgrade`` request is answered, then closed;
- a request not complete within ``request_timeout`` seconds: 408 and close (slow
  clients cannot hold connections open); an idle keep-alive connection is closed after
  ``keep_alive_timeout`` seconds (config: ``ocsp_request_read_timeout``,
  ``ocsp_keep_alive_timeout``); a closed connection whose client has not taken its
  answers ``request_timeout`` seconds later is aborted (a client that never reads
  cannot hold the connection and its buffered answers);
- the socket is not read while the write buffer is past its high water (back-pressure
  on a client that sends requests and does not read the answers);
- each refusal (400/408/413/431) is counted in ``ocsp_http_refusals_total{status}`` and
  logged, at most one line a minute with the counts since the last;
- on shutdown: stop accepting, close idle connections, let answers in progress finish
  (bounded), then close the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Coroutine
from email.utils import formatdate
from time import monotonic, time
from typing import Any, cast

import httptools

from responder import metrics
from responder.ocsp_endpoint import (
    BAD_CONTENT_LENGTH,
    TOO_LARGE,
    OCSPEndpoint,
    Reply,
    plain_reply,
)
from responder.protocol import MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

#: Request line plus headers. A GET carries the base64 request in its path: 10 KiB of
#: DER is ~14 KiB of base64, ~41 KiB if every character were percent-encoded.
MAX_HEAD_BYTES = 64 * 1024
#: parsed requests waiting behind a slow answer on one connection (pipelining)
MAX_QUEUED = 32
#: seconds between two log lines about HTTP-level refusals (each is counted in metrics)
REFUSAL_LOG_INTERVAL = 60

_REASONS = {
    200: b"OK",
    304: b"Not Modified",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BAD_REQUEST = plain_reply(400, b"bad request: not parseable as HTTP/1.1\n")
_HEAD_TOO_LARGE = plain_reply(431, b"request line and headers too large\n")
_TIMEOUT = plain_reply(408, b"request not completed in time\n")

_date_second = 0
_date_header = b""


def _date() -> bytes:
    """The Date header line, formatted once a second (RFC 9110 6.6.1)."""
    global _date_second, _date_header
    now = int(time())
    if now != _date_second:
        _date_second = now
        _date_header = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_header


_END_KEEP_ALIVE = (b"\r\n", b"connection: keep-alive\r\n\r\n")  # HTTP/1.1, HTTP/1.0
_END_CLOSE = b"connection: close\r\n\r\n"


def encode_reply(reply: Reply, keep_alive: bool, http10: bool = False) -> bytes:
    """Status line, headers and body as one buffer (one write, one syscall)."""
    status_line = _STATUS_LINES.get(reply.status) or b"HTTP/1.1 %d Status\r\n" % reply.status
    parts = [status_line, _date()]
    for name, value in reply.headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(_END_KEEP_ALIVE[http10] if keep_alive else _END_CLOSE)
    parts.append(reply.body)
    return b"".join(parts)


class _Request:
    """What the answer needs of one parsed request."""

    __slots__ = (
        "body",
        "content_type",
        "expect_continue",
        "http10",
        "if_none_match",
        "keep_alive",
        "method",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.method = ""
        self.content_type = b""
        self.if_none_match: bytes | None = None
        self.body = b""
        self.keep_alive = True
        self.http10 = False
        self.expect_continue = False


class _Close(Exception):
    """Raised from a parser callback: answer ``reply``, then close the connection."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


#: seconds between looks at the connections still busy while close() drains them
DRAIN_POLL_INTERVAL = 0.02


class _Stopped(Exception):
    """Raised from a parser callback: the connection takes no more requests."""


class OCSPHttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: OCSPHttpServer) -> None:
        self.server = server
        self.endpoint = server.endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request: _Request | None = None  # being parsed
        self.head_bytes = 0  # of its request line and headers, as the parser passed them on
        self.in_head = False  # its headers are not complete yet
        self.head_received = 0  # bytes received while inside its head (see data_received)
        self.started_at = 0.0  # when the request being parsed began
        self.last_active = monotonic()  # a request began or an answer was written
        #: parsed requests waiting their turn; a Reply is a refusal to send, then close
        self.queue: deque[_Request | Reply] = deque()
        self.task: asyncio.Task[None] | None = None  # the answer being awaited
        self.closing = False
        self.closing_seen_at = 0.0  # when the sweeper first found it closing
        self.stopped = False  # no more requests are parsed (the connection will close)
        self.reading_paused = False
        self.writing_paused = False  # the transport's write buffer is past its high water

    # -- connection events -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.stopped = True
        self.queue.clear()
        self.server.connections.discard(self)
        # the parser holds this protocol: break the cycle so that reference counting
        # frees the pair now, not the cyclic GC later (after warm-up's gc.freeze, never)
        del self.parser

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return
        in_head = self.request if self.in_head else None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # the request asking to switch protocols was answered or queued (as the
            # connection's last: we speak only HTTP/1.1 here)
            self._stop_reading()
        except httptools.HttpParserCallbackError as exc:
            failure = exc.__context__
            if isinstance(failure, _Close):
                self._refuse(failure.reply)
            elif not isinstance(failure, _Stopped):
                log.error("HTTP parser callback failed", exc_info=failure)
                self._refuse(_BAD_REQUEST)
        except httptools.HttpParserError:
            # llhttp refuses bytes after a request that ends the connection ("Data after
            # `Connection: close`"): those are ignored, not a refusal to count and log
            if not self.stopped:
                self._refuse(_BAD_REQUEST)
        # httptools keeps a header's name and value to itself until the header ends (no
        # callback before): a header line that never ends would grow in memory, and be
        # copied on each chunk, until the request timeout. A chunk that began and ended
        # inside the same request's head was all head: count it against the limit.
        if in_head is not None and in_head is self.request and self.in_head:
            self.head_received += len(data)
            if self.head_received > MAX_HEAD_BYTES and not self.stopped:
                self._refuse(_HEAD_TOO_LARGE)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if len(self.queue) < MAX_QUEUED:
            self._resume_reading()

    # -- parser callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.stopped:
            raise _Stopped
        self.request = _Request()
        self.head_bytes = 0
        self.in_head = True
        self.head_received = 0
        # idle time counts from a request's start or an answer's write, not from any
        # bytes: empty lines before a request line (which llhttp skips) kept an idle
        # connection open forever, two bytes at a time
        self.started_at = self.last_active = monotonic()

    def on_url(self, url: bytes) -> None:
        assert self.request is not None
        self.request.url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _Close(_HEAD_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.request
        assert request is not None
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _Close(_HEAD_TOO_LARGE)
        name = name.lower()
        if name == b"if-none-match":
            request.if_none_match = value
        elif name == b"content-type":
            request.content_type = value.split(b";", 1)[0].strip().lower()
        elif name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise _Close(BAD_CONTENT_LENGTH) from None
            if declared > MAX_REQUEST_BYTES:
                raise _Close(TOO_LARGE)
        elif name == b"expect" and value.lower() == b"100-continue":
            request.expect_continue = True

    def on_headers_complete(self) -> None:
        request = self.request
        assert request is not None
        self.in_head = False
        request.method = self.parser.get_method().decode("ascii", "replace")
        request.http10 = self.parser.get_http_version() == "1.0"
        # an HTTP/1.0 client cannot parse a 1xx: it MUST ignore the expectation (RFC
        # 9110 10.1.1), else that client (or a 1.0 proxy) takes "100" for the answer
        if request.expect_continue and not request.http10 and self.task is None and not self.queue:
            assert self.transport is not None
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        request = self.request
        assert request is not None
        if len(request.body) + len(body) > MAX_REQUEST_BYTES:
            raise _Close(TOO_LARGE)
        request.body += body

    def on_message_complete(self) -> None:
        request = self.request
        assert request is not None
        self.request = None
        request.keep_alive = self.parser.should_keep_alive() and not self.parser.should_upgrade()
        if self.task is not None or self.queue:
            self.queue.append(request)
            if len(self.queue) >= MAX_QUEUED:
                self._pause_reading()
        else:
            self._answer(request)
        if not request.keep_alive:
            self._stop_reading()

    # -- answering ---------------------------------------------------------------------
    def _answer(self, request: _Request) -> None:
        url = request.url
        query = url.find(b"?")
        path = url if query < 0 else url[:query]
        if not path.startswith(b"/"):  # absolute-form (RFC 9112 3.2.2), e.g. from a proxy
            try:
                path = httptools.parse_url(url).path or b"/"
            except httptools.HttpParserInvalidURLError:
                self.server.refused(_BAD_REQUEST.status, self.transport)
                self._write(_BAD_REQUEST, False)
                return
        try:
            answer = self.endpoint.handle(
                request.method,
                path,
                request.body,
                content_type=request.content_type,
                if_none_match=request.if_none_match,
            )
        except Exception:
            log.exception("unhandled error serving %s", request.method)
            answer = self.endpoint.internal_error(request.method, request.method == "HEAD")
        if isinstance(answer, Reply):
            self._write(answer, request.keep_alive, request.http10)
        else:
            self.task = asyncio.get_running_loop().create_task(
                self._finish(answer, request), name="ocsp-answer"
            )
            self.server.tasks.add(self.task)

    async def _finish(self, answer: Coroutine[Any, Any, Reply], request: _Request) -> None:
        try:
            reply = await answer
        except Exception:
            log.exception("unhandled error serving %s", request.method)
            reply = self.endpoint.internal_error(request.method, request.method == "HEAD")
        finally:
            if self.task is not None:
                self.server.tasks.discard(self.task)
            self.task = None
        self._write(reply, request.keep_alive, request.http10)
        while self.queue and self.task is None and not self.closing:
            waiting = self.queue.popleft()
            if isinstance(waiting, Reply):
                self._write(waiting, False)
            else:
                self._answer(waiting)
        if len(self.queue) < MAX_QUEUED:
            self._resume_reading()

    def _write(self, reply: Reply, keep_alive: bool, http10: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.server.draining and not self.queue:
            keep_alive = False  # shutting down: tell the client, rather than drop it idle
        transport.write(encode_reply(reply, keep_alive, http10))
        self.last_active = monotonic()
        if not keep_alive:
            self.closing = True
            self.queue.clear()
            transport.close()

    def _refuse(self, reply: Reply) -> None:
        """Unusable input: answer it after what is already queued, then close."""
        self.server.refused(reply.status, self.transport)
        self._stop_reading()
        if self.task is None and not self.queue:
            self._write(reply, False)
        else:
            self.queue.append(reply)

    def _stop_reading(self) -> None:
        """Parse nothing more from this connection (it closes after its answers)."""
        self.stopped = True
        self.request = None
        self._pause_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        """Read again, unless the client is not reading its answers (the write buffer
        past its high water): each request read then grows that buffer without bound."""
        if (
            self.reading_paused
            and not self.writing_paused
            and self.transport is not None
            and not self.stopped
        ):
            self.reading_paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    # -- housekeeping (called by the server's sweeper) --------------------------------
    def sweep(self, now: float, keep_alive_timeout: float, request_timeout: float) -> None:
        if self.transport is None:
            return
        if self.closing:
            # close() waits for the write buffer to drain: a client that never reads
            # (zero window) would hold the connection and its buffer forever
            if not self.closing_seen_at:
                self.closing_seen_at = now
            elif now - self.closing_seen_at > request_timeout:
                self.transport.abort()
            return
        busy = self.task is not None or bool(self.queue)
        if self.request is not None and not busy:
            if now - self.started_at > request_timeout:
                self.server.refused(_TIMEOUT.status, self.transport)
                self._stop_reading()
                self._write(_TIMEOUT, False)
        elif not busy and now - self.last_active > keep_alive_timeout:
            self.closing = True
            self.transport.close()

    def close_if_idle(self) -> None:
        """At shutdown: close now unless an answer is in progress or owed."""
        if self.task is None and not self.queue and self.request is None:
            self.closing = True
            if self.transport is not None:
                self.transport.close()


class OCSPHttpServer:
    """The OCSP listener: accepts connections and runs ``OCSPHttpProtocol`` on each."""

    def __init__(
        self,
        endpoint: OCSPEndpoint,
        *,
        keep_alive_timeout: float = 5.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.keep_alive_timeout = keep_alive_timeout
        self.request_timeout = request_timeout
        self.connections: set[OCSPHttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: refusals not yet logged, by status, and when the last log line was written
        self._unlogged: dict[int, int] = {}
        self._refusal_logged_at = -float(REFUSAL_LOG_INTERVAL)
        self._latest_refused_peer = "unknown"
        #: set by close(): each answer from then on ends its connection
        self.draining = False

    def refused(self, status: int, transport: asyncio.BaseTransport | None) -> None:
        """Count an HTTP-level refusal; log refusals at most once per
        ``REFUSAL_LOG_INTERVAL`` (a flood of garbage must not flood the log too): the
        counts held back are logged by the sweeper once the interval has passed."""
        metrics.http_refusals_total.labels(str(status)).inc()
        self._unlogged[status] = self._unlogged.get(status, 0) + 1
        peer = transport.get_extra_info("peername") if transport is not None else None
        self._latest_refused_peer = peer[0] if isinstance(peer, tuple) else "unknown"
        self.log_refusals(monotonic())

    def log_refusals(self, now: float) -> None:
        """One line with the refusals not logged yet, if the interval has passed."""
        if not self._unlogged or now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            return
        counts = ", ".join(f"{n} x {code}" for code, n in sorted(self._unlogged.items()))
        log.warning(
            "OCSP port refused HTTP requests: %s (latest from %s; logged at most every %ds)",
            counts,
            self._latest_refused_peer,
            REFUSAL_LOG_INTERVAL,
        )
        self._unlogged.clear()
        self._refusal_logged_at = now

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen (on ``sock`` when a supervisor bound it); raises OSError if it cannot."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(
                lambda: OCSPHttpProtocol(self), sock=sock, backlog=4096
            )
        else:
            self._server = await loop.create_server(
                lambda: OCSPHttpProtocol(self), host, port, backlog=4096, reuse_address=True
            )
        self._sweeper = loop.create_task(self._sweep(), name="ocsp-http-sweeper")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = monotonic()
            for connection in list(self.connections):
                connection.sweep(now, self.keep_alive_timeout, self.request_timeout)
            self.log_refusals(now)  # counts held back during the last interval

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; let requests in progress be received and answered (at most
        ``grace`` s), each answer saying ``Connection: close``; close the idle ones.

        Only answers already being computed were waited for: a request whose body (or
        head) was still arriving at SIGTERM had its connection closed under it."""
        if self._server is None:
            return
        self._server.close()
        self.draining = True
        deadline = monotonic() + grace
        while True:
            for connection in list(self.connections):
                connection.close_if_idle()
            if not self.tasks and all(c.closing for c in self.connections):
                break
            if monotonic() >= deadline:
                break
            await asyncio.sleep(DRAIN_POLL_INTERVAL)
        for connection in list(self.connections):
            connection.closing = True
            if connection.transport is not None:
                connection.transport.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._server = None
