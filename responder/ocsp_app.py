"""The OCSP endpoint as an ASGI app, for ASGI servers (``ocsp_http_server = "uvicorn"``)
and the fuzz tests. The answers themselves are responder/ocsp_endpoint.py's; this module
only carries them over ASGI messages.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from responder.ocsp_endpoint import (
    BAD_CONTENT_LENGTH,
    TOO_LARGE,
    OCSPEndpoint,
    Reply,
)
from responder.protocol import MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class OCSPApp:
    """ASGI callable around one ``OCSPEndpoint``."""

    def __init__(self, endpoint: OCSPEndpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        method: str = scope["method"]
        try:
            reply = await self._reply(scope, receive, method)
        except Exception:
            # Last line of defence: a bug must not become a 500 with a traceback page.
            log.exception("unhandled error serving %s", method)
            reply = self.endpoint.internal_error(method, method == "HEAD")
        if reply is None:  # the client went away mid-body
            return
        # if the response had already started, this fails and the connection closes
        with contextlib.suppress(Exception):
            await send(
                {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
            )
            await send({"type": "http.response.body", "body": reply.body})

    async def _reply(self, scope: Scope, receive: Receive, method: str) -> Reply | None:
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        content_type = b""
        if_none_match: bytes | None = None
        length = -1
        for name, value in scope["headers"]:
            if name == b"if-none-match":
                if_none_match = value
            elif name == b"content-type":
                content_type = value.split(b";", 1)[0].strip().lower()
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return BAD_CONTENT_LENGTH
        body = b""
        if method == "POST":
            if length > MAX_REQUEST_BYTES:
                return TOO_LARGE
            received = await _read_body(receive)
            if received is None:
                return None
            body = received
        answer = self.endpoint.handle(
            method, path, body, content_type=content_type, if_none_match=if_none_match
        )
        return answer if isinstance(answer, Reply) else await answer


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, stopping once it passes the limit; None if the client left."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    while message.get("more_body", False) and len(body) <= MAX_REQUEST_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
    return body


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
