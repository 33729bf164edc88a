"""The OCSP request log: errors always, successes sampled.

The hot path calls ``log_answer`` once per request; it costs one integer increment for a
sampled-out success. The log format (JSON lines) is set up by the logging configuration,
not here. Serials are logged in hex; key material never reaches a log.
"""

from __future__ import annotations

import itertools
import logging

request_log = logging.getLogger("ocsp.requests")

#: Log one success in this many (errors are always logged).
SUCCESS_SAMPLE_EVERY = 1000
_counter = itertools.count()
_ids = itertools.count(1)


def next_request_id() -> int:
    """A per-process request id, cheap enough for every request."""
    return next(_ids)


def log_answer(
    *,
    request_id: int,
    method: str,
    result: str,
    source: str,
    serial: int | None,
    issuer: str | None,
    seconds: float,
    error: bool,
) -> None:
    """Record one answer: always when ``error``, else one in SUCCESS_SAMPLE_EVERY."""
    if not error and next(_counter) % SUCCESS_SAMPLE_EVERY:
        return
    request_log.log(
        logging.WARNING if error else logging.INFO,
        "ocsp %s %s",
        method,
        result,
        extra={
            "request_id": request_id,
            "method": method,
            "result": result,
            "source": source,
            "serial": None if serial is None else format(serial, "x"),
            "issuer": issuer,
            "duration_ms": round(seconds * 1000, 3),
            "sampled": not error,
        },
    )
