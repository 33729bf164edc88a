"""Per-request metrics at the cost of a dict increment: counted locally, flushed each second.

The hot path answers tens of thousands of requests a second per core; prometheus-client's
``labels(...).inc()`` plus ``Histogram.observe`` cost ~2.5 us a request, a tenth of the
whole budget. ``AnswerStats`` counts answers in plain dicts and lists and adds the totals
to ``ocsp_requests_total`` and ``ocsp_request_seconds`` (responder/metrics.py) on
``flush()``, which the server calls every second (and /metrics may call before rendering).
A scrape therefore lags by at most a second; nothing is lost.
"""

from __future__ import annotations

from bisect import bisect_left

from responder.metrics import ocsp_request_seconds, ocsp_requests_total

_BOUNDS: tuple[float, ...] = tuple(ocsp_request_seconds._upper_bounds)


class AnswerStats:
    """Local counters for ocsp_requests_total{method,result,source} and ocsp_request_seconds."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}
        self._buckets = [0] * len(_BOUNDS)
        self._seconds = 0.0

    def count(self, method: str, result: str, source: str, seconds: float) -> None:
        """One answer (called once per request)."""
        key = (method, result, source)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        self._buckets[bisect_left(_BOUNDS, seconds)] += 1
        self._seconds += seconds

    def flush(self) -> None:
        """Add what was counted since the last flush to the prometheus metrics."""
        counts, self._counts = self._counts, {}
        buckets, self._buckets = self._buckets, [0] * len(_BOUNDS)
        seconds, self._seconds = self._seconds, 0.0
        for (method, result, source), n in counts.items():
            ocsp_requests_total.labels(method, result, source).inc(n)
        if any(buckets):
            # Histogram has no bulk observe: add to its sum and bucket values directly,
            # exactly what observe() does one sample at a time.
            ocsp_request_seconds._sum.inc(seconds)
            for index, n in enumerate(buckets):
                if n:
                    ocsp_request_seconds._buckets[index].inc(n)
