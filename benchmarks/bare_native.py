"""The native server's ceiling: responder/ocsp_http.py answering every request with fixed bytes.

The same bytes and headers as benchmarks/bare_app.py (the uvicorn ceiling), through the
very protocol class the responder's OCSP port runs, with an endpoint that does nothing:
the ratio of the responder to this is what its own work (parse, lookup, headers, metrics)
costs on top of its HTTP layer.

    python -m benchmarks.bare_native PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, cast

import uvloop

from benchmarks.bare_app import BODY, START
from responder.ocsp_endpoint import OCSPEndpoint, Reply
from responder.ocsp_http import OCSPHttpServer

REPLY = Reply(200, list(START["headers"]), BODY)


class FixedEndpoint:
    """Answers everything with ``REPLY``, at once."""

    def handle(self, *args: Any, **kwargs: Any) -> Reply:
        return REPLY

    def internal_error(self, method: str, head: bool) -> Reply:
        return REPLY


async def main(port: int) -> None:
    server = OCSPHttpServer(cast(OCSPEndpoint, FixedEndpoint()))
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
