"""Log record formatting: one JSON object per line (orjson), or plain text for a terminal.

Fields passed with ``extra=`` (the request log's ``request_id``, ``serial``, ``issuer``...)
become top-level JSON keys, so a log pipeline can filter on them without parsing messages.
Key material must never reach a log: every formatted line is checked for PEM blocks and
redacted before it is written (a last line of defence; nothing logs keys on purpose).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

import orjson

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName", "color_message"}  # uvicorn's ANSI copy of msg

#: A PEM block of any kind (private keys above all, but certificates are noise in logs too).
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)
REDACTED = "[redacted PEM block]"

LOG_FORMATS = ("json", "text")


def redact(text: str) -> str:
    """Replace PEM blocks (and a truncated trailing one) so no key bytes are written."""
    if "-----BEGIN" not in text:
        return text
    return _PEM_BLOCK.sub(REDACTED, text)


def _default(value: object) -> Any:
    """orjson fallback for extras it cannot encode natively (bytes, paths, exceptions)."""
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class JSONFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extras, "exc"}`` as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = redact(record.exc_text)
        return orjson.dumps(entry, default=_default).decode()


class TextFormatter(logging.Formatter):
    """The human format, with the same redaction."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class ExpectedFailureFilter(logging.Filter):
    """For loggers whose failures are expected during an outage (asyncpg's pool retrying
    its connections while PostgreSQL is down): keep the line, drop the traceback, name
    the exception in the message instead. An operator reads "database down", not a trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


#: Libraries whose retry warnings carry tracebacks of expected connection failures.
QUIET_TRACEBACK_LOGGERS = ("asyncpg.pool",)


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter for the ``log_format`` configuration key."""
    if log_format == "json":
        return JSONFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log_format: expected one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
