"""The Python ceiling: a bare ASGI app answering every request with fixed bytes.

Run by benchmarks/run.py under uvicorn with the responder's settings (httptools, uvloop,
no access log, no lifespan). The body (env OCSP_BENCH_BODY, a file) is a real OCSP
response and the headers are the ones RFC 5019 has the responder send (fixed values
here), so the bytes on the wire match the responder's: the ratio measures what the
responder's own work costs, not the size of its answer.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

BODY = Path(os.environ.get("OCSP_BENCH_BODY", "/dev/null")).read_bytes() or b"\x30\x03\x0a\x01\x06"
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"application/ocsp-response"),
        (b"content-length", str(len(BODY)).encode()),
        (b"cache-control", b"max-age=3600, public, no-transform, must-revalidate"),
        (b"etag", b'"' + b"0" * 64 + b'"'),
        (b"last-modified", b"Thu, 26 Nov 2026 16:00:00 GMT"),
        (b"expires", b"Mon, 30 Nov 2026 16:00:00 GMT"),
    ],
}
MESSAGE = {"type": "http.response.body", "body": BODY}


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] == "POST":
        message = await receive()
        while message.get("more_body", False):
            message = await receive()
    await send(START)
    await send(MESSAGE)
