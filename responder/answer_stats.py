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

from prometheus_client import Histogram

from responder.metrics import ocsp_request_seconds, ocsp_requests_total, response_age_seconds

_BOUNDS: tuple[float, ...] = tuple(ocsp_request_seconds._upper_bounds)
_AGE_BOUNDS: tuple[float, ...] = tuple(response_age_seconds._upper_bounds)


class AnswerStats:
    """Local counters for ocsp_requests_total{method,result,source}, ocsp_request_seconds
    and ocsp_response_age_seconds (now - thisUpdate of each signed response served)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}
        self._buckets = [0] * len(_BOUNDS)
        self._seconds = 0.0
        self._age_buckets = [0] * len(_AGE_BOUNDS)
        self._ages = 0.0

    def count(
        self, method: str, result: str, source: str, seconds: float, age: int | None = None
    ) -> None:
        """One answer (called once per request); ``age`` for a signed response served."""
        key = (method, result, source)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        self._buckets[bisect_left(_BOUNDS, seconds)] += 1
        self._seconds += seconds
        if age is not None:
            self._age_buckets[bisect_left(_AGE_BOUNDS, age)] += 1
            self._ages += age

    def flush(self) -> None:
        """Add what was counted since the last flush to the prometheus metrics."""
        counts, self._counts = self._counts, {}
        buckets, self._buckets = self._buckets, [0] * len(_BOUNDS)
        seconds, self._seconds = self._seconds, 0.0
        age_buckets, self._age_buckets = self._age_buckets, [0] * len(_AGE_BOUNDS)
        ages, self._ages = self._ages, 0.0
        for (method, result, source), n in counts.items():
            ocsp_requests_total.labels(method, result, source).inc(n)
        _add(ocsp_request_seconds, buckets, seconds)
        _add(response_age_seconds, age_buckets, ages)


def _add(histogram: Histogram, buckets: list[int], total: float) -> None:
    """Histogram has no bulk observe: add to its sum and bucket values directly, exactly
    what observe() does one sample at a time."""
    if any(buckets):
        histogram._sum.inc(total)
        for index, n in enumerate(buckets):
            if n:
                histogram._buckets[index].inc(n)
