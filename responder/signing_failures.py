"""One log line per signer outage, not one traceback per request.

When an issuer cannot sign (its responder certificate expired or expires too soon, its
PKCS#11 token went away), every on-demand request for it fails the same way: answered
``tryLater``, which is right, but a traceback per request buries the one line the operator
needs under thousands. ``SigningFailureLog`` logs the first failure of an issuer at once,
as one ERROR line without a traceback, then at most one line per ``interval`` with the
count of failures meanwhile; every failure is counted in
``ocsp_on_demand_signing_failures_total{issuer, error}``.
"""

from __future__ import annotations

import logging
import time

from responder import metrics

log = logging.getLogger(__name__)

#: seconds between two log lines about one issuer's signing failures
LOG_INTERVAL = 60.0


class SigningFailureLog:
    """Rate-limited reporting of on-demand signing failures, per issuer and error kind."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        #: (issuer, kind) -> (monotonic time of the last line, failures not logged since)
        self._state: dict[tuple[str, str], tuple[float, int]] = {}

    def report(self, issuer: str, exc: BaseException, *, expected: bool) -> None:
        """Count one failure; log it unless a line about it went out < interval ago.

        ``expected``: a signer refusal (``SigningError``: the message says it all, no
        traceback); otherwise a bug, logged with its traceback (but rate-limited too)."""
        kind = type(exc).__name__
        metrics.on_demand_signing_failures_total.labels(issuer, kind).inc()
        now = time.monotonic()
        last, suppressed = self._state.get((issuer, kind), (None, 0))
        if last is not None and now - last < self.interval:
            self._state[issuer, kind] = (last, suppressed + 1)
            return
        self._state[issuer, kind] = (now, 0)
        more = f" ({suppressed} more since the last line)" if suppressed else ""
        if expected:
            log.error("on-demand signing refused for issuer %s: %s%s", issuer, exc, more)
        else:
            log.error("on-demand signing failed for issuer %s%s", issuer, more, exc_info=exc)
