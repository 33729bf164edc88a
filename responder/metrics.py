"""Prometheus metrics: every metric this service exports is declared here, once.

Names say what they count; labels are small closed sets (never serials). With several
worker processes, set PROMETHEUS_MULTIPROC_DIR (``serve --workers`` does) and
``/metrics`` aggregates all workers through prometheus-client's multiprocess collector.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess


def _prepare_multiprocess_dir() -> None:
    """Create PROMETHEUS_MULTIPROC_DIR if missing, and fail in one line if unusable.

    prometheus-client opens its sample files there as the metrics below are declared,
    at import: a directory that did not exist (a typo, a container without it) or could
    not be written ended every command in a 20-line traceback from inside the library."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SystemExit(
            f"ocsp-responder: error: PROMETHEUS_MULTIPROC_DIR {path}: not a writable directory "
            f"({exc.strerror or exc})"
        ) from None


_prepare_multiprocess_dir()

#: OCSP answers by method (GET/POST/HEAD), result (good, revoked, unauthorized,
#: malformed, try_later, internal_error, not_modified) and source (cache, store, live, none).
ocsp_requests_total = Counter(
    "ocsp_requests_total", "OCSP requests answered", ["method", "result", "source"]
)
ocsp_request_seconds = Histogram(
    "ocsp_request_seconds",
    "Time to answer an OCSP request",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
signing_seconds = Histogram(
    "ocsp_signing_seconds",
    "Time to sign one OCSP response",
    ["issuer"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
)
#: on-demand signatures that failed (answered tryLater), by issuer and exception type
#: (SigningError: the signer refused, e.g. its certificate expires too soon or its token
#: is gone; responder/signing_failures.py logs them once a minute, without tracebacks)
on_demand_signing_failures_total = Counter(
    "ocsp_on_demand_signing_failures_total",
    "On-demand signatures that failed (answered tryLater)",
    ["issuer", "error"],
)
signing_queue_depth = Gauge(
    "ocsp_signing_queue_depth",
    "On-demand signatures waiting or running (the busiest worker: the limit is per worker)",
    multiprocess_mode="livemax",
)
#: HTTP-level refusals on the OCSP port, before any OCSP request existed (status: 400
#: unparseable, 408 too slow, 413 body too large, 431 head too large); each closes the
#: connection. Not in ocsp_requests_total.
http_refusals_total = Counter(
    "ocsp_http_refusals_total", "HTTP requests refused before OCSP parsing", ["status"]
)
recordings_total = Counter("ocsp_recordings_total", "Certificates recorded", ["issuer", "result"])
recording_failures_total = Counter(
    "ocsp_recording_failures_total", "Recordings that were refused or failed", ["reason"]
)
#: the reasons recording_failures_total counts (signer/recording.py, store.failure_reason)
RECORDING_FAILURE_REASONS = (
    "connection",
    "timeout",
    "conflict",
    "database_error",
    "internal",
    "cancelled",
    "signing",
    "refused",
    "unknown_issuer",
    "serial_collision",
)
revocations_total = Counter("ocsp_revocations_total", "Revocations recorded", ["issuer"])
coverage_gaps_total = Counter(
    "coverage_gaps_total",
    "Serials known (e.g. from CT) that had no stored response when first needed",
    ["issuer"],
)
ct_entries_indexed_total = Counter(
    "ct_entries_indexed_total", "CT entries of our issuers indexed", ["log"]
)
ct_suspicious_entries_total = Counter(
    "ct_suspicious_entries_total",
    "CT precert entries naming our issuer_key_hash that our issuer did not sign (not indexed), "
    "or that it signed but whose logged TBSCertificate differs (indexed by the precertificate)",
    ["log"],
)
ct_lag_seconds = Gauge(
    "ct_lag_seconds",
    "Seconds from the newest indexed entry's log timestamp to its authoritative answer",
    ["log"],
    multiprocess_mode="max",
)
ct_log_position = Gauge(
    "ct_log_position", "Next leaf index to read per log", ["log"], multiprocess_mode="max"
)
#: The CT follower's progress and the open coverage gaps, read from the database by
#: ``serve`` (responder/ct_coverage.py) whichever process follows the logs (``ct-follow``
#: beside it has no metrics endpoint): the alerts of docs/deploy.md rest on these.
ct_log_seconds_since_update = Gauge(
    "ct_log_seconds_since_update",
    "Seconds since the follower last wrote this log's row (poll, batch or error); +Inf: "
    "a configured log never polled",
    ["log"],
    multiprocess_mode="max",
)
ct_log_poll_failing = Gauge(
    "ct_log_poll_failing",
    "1 when the last poll of this log failed",
    ["log"],
    multiprocess_mode="max",
)
ct_log_behind_entries = Gauge(
    "ct_log_behind_entries",
    "Entries of the verified tree head not yet indexed (tree size - next index)",
    ["log"],
    multiprocess_mode="max",
)
coverage_gaps_open = Gauge(
    "coverage_gaps_open",
    "Serials in CT with no stored response that are not repaired yet (and not retired)",
    ["issuer"],
    multiprocess_mode="max",
)
response_age_seconds = Histogram(
    "ocsp_response_age_seconds",
    "Age (now - thisUpdate) of served responses",
    buckets=(3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 3 * 86400, 3.5 * 86400, 4 * 86400),
)
responses_past_refresh_deadline = Gauge(
    "ocsp_responses_past_refresh_deadline",
    "Stored responses past their BR refresh deadline (must stay 0)",
    multiprocess_mode="max",
)
#: Unix time at which an issuer's last responder certificate of an unbroken chain from now
#: (or the issuer certificate, if earlier) expires: responses are capped at it, and no
#: revocation can be signed from 8 h before it (responder/signer_expiry.py). Alert well
#: ahead: it is the rollover deadline.
signer_expiry_timestamp = Gauge(
    "ocsp_signer_expiry_timestamp_seconds",
    "When the issuer's last signing certificate expires (Unix time)",
    ["issuer"],
    multiprocess_mode="max",
)
refresher_backlog = Gauge(
    "ocsp_refresher_backlog", "Responses due for re-signing", multiprocess_mode="max"
)
stored_response_age_seconds = Gauge(
    "ocsp_stored_response_age_seconds",
    "Age (now - thisUpdate) of the stored responses in the refresh cycle, sampled from the "
    "database by the refresher (quantile 1 = oldest of the sample)",
    ["quantile"],
    multiprocess_mode="max",
)
refresher_resigned_total = Counter(
    "ocsp_refresher_resigned_total", "Responses re-signed by the refresher", ["issuer", "reason"]
)
refresher_failures_total = Counter(
    "ocsp_refresher_failures_total",
    "Refresher batches that failed (signing refused, database error)",
    ["issuer", "error"],
)
invalidation_listener_reconnects_total = Counter(
    "ocsp_invalidation_listener_reconnects_total",
    "Times the LISTEN connection was (re)established after a loss (the cache is cleared)",
)
cdn_purges_total = Counter("ocsp_cdn_purges_total", "CDN purge calls after revocations", ["result"])
cache_invalidations_total = Counter(
    "ocsp_cache_invalidations_total", "Cached responses dropped on notification"
)
db_pool_connections = Gauge(
    "ocsp_db_pool_connections",
    "Database pool connections",
    ["pool", "state"],
    multiprocess_mode="sum",
)

#: Readiness's own count (responder/health.py): responses of unexpired certificates whose
#: nextUpdate - refresh_margin + refresh_deadline_slack has passed. An earlier warning than
#: the refresher's ocsp_responses_past_refresh_deadline (BR limit).
responses_overdue_refresh = Gauge(
    "ocsp_responses_overdue_refresh",
    "Stored responses overdue for refresh, as counted by the readiness check",
    multiprocess_mode="max",
)
#: livemin: the ``serve --workers`` supervisor, which checks nothing, drops its own sample
#: (responder/workers.py); the health monitor sets it every health_check_interval
readiness_ready = Gauge(
    "ocsp_ready", "1 when the last readiness check passed", multiprocess_mode="livemin"
)


db_replica_up = Gauge(
    "ocsp_db_replica_up",
    "1 when the read replica is healthy and used for lookups, 0 when lookups use the primary",
    ["replica"],
    multiprocess_mode="min",
)
db_replica_lag_seconds = Gauge(
    "ocsp_db_replica_lag_seconds",
    "Replay lag of the read replica",
    ["replica"],
    multiprocess_mode="max",
)

#: Batched store lookups (responder/store_lookup.py): the keys per statement show what the
#: batching saves (all in bucket 1: nothing to batch, the responder is nearly idle).
store_lookup_batch_keys = Histogram(
    "ocsp_store_lookup_batch_keys",
    "Distinct keys read by one batched store lookup",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

#: Keys refused because ``store_lookup_queue_limit`` keys already waited for a batch (the
#: database is behind): each such request was answered tryLater at once.
store_lookups_refused_total = Counter(
    "ocsp_store_lookups_refused_total",
    "Store lookups refused (tryLater) because too many waited for the database",
)
store_lookup_queue_depth = Gauge(
    "ocsp_store_lookup_queue_depth",
    "Distinct serials waiting for a batched store lookup (the busiest worker: the limit is "
    "per worker)",
    multiprocess_mode="livemax",
)


def export_zero_series(issuers: Iterable[str]) -> None:
    """Export the labelled counters the alerts of docs/deploy.md take ``increase()`` of at 0.

    A labelled series appears only at its first increment, already at 1, and
    ``increase()`` has no earlier sample to compare with: the first serial collision, the
    first lost recording found in CT, the first failed recording or on-demand signature
    of a process paged nobody."""
    for reason in RECORDING_FAILURE_REASONS:
        recording_failures_total.labels(reason)
    for issuer in issuers:
        coverage_gaps_total.labels(issuer)
        on_demand_signing_failures_total.labels(issuer, "SigningError")


def render() -> tuple[bytes, str]:
    """The exposition text: aggregated across workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
