"""The CT follower's progress and open coverage gaps as metrics of ``serve``.

Why here and not in the follower: by default the follower runs as its own process
(``ocsp-responder ct-follow``), which has no metrics endpoint, so the counters it keeps
(``coverage_gaps_total``, ``ct_lag_seconds``) never reached Prometheus, and a follower
that was not running at all, or a log that had failed for an hour, raised no alert. The
database holds the truth whichever process follows: ``serve`` (worker 0) reads it every
``health_check_interval`` (two small queries: the ``ct_logs`` rows, and the open gaps,
each looked up by key: the cost grows with the open gaps, never with the CT index; 30,000
open gaps took ~0.4 s here) and exports it (docs/deploy.md, "Alerts").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
from collections.abc import Sequence

import asyncpg

from responder import metrics
from responder.config import CTLogConfig
from responder.ct import LogKey
from responder.ct_index_store import retired_before
from responder.schema import ct_index_has_not_after
from signer.issuers import IssuerRegistry

log = logging.getLogger(__name__)

_LOGS = (
    "SELECT log_id, next_index, tree_size, lag_seconds, last_error IS NOT NULL AS failing, "
    "       extract(epoch FROM now() - updated_at)::float8 AS age "
    "FROM ct_logs"
)


def open_gaps_query(with_not_after: bool) -> str:
    """Unrepaired gaps per issuer, leaving out retired serials (expired beyond
    ``expired_retention``: answered unauthorized on purpose, their rows stay open as the
    record that they were never covered, and must not hold an alert up for ever).

    Each open gap's notAfter is looked up by primary key (a subquery per gap, in
    ``certificates``, then ``ct_index``): as joins, a few thousand open gaps (an issuer
    without a key, retired rows that accumulate) made the planner hash both tables whole,
    a sequential scan of the CT index at every ``health_check_interval``."""
    lookups = [
        "(SELECT c.not_after FROM certificates c "
        " WHERE c.issuer_id = g.issuer_id AND c.serial = g.serial)"
    ]
    if with_not_after:
        lookups.append(
            "(SELECT t.not_after FROM ct_index t "
            " WHERE t.issuer_id = g.issuer_id AND t.serial = g.serial)"
        )
    # no known notAfter: not retired
    not_after = f"coalesce({', '.join(lookups)}, 'infinity'::timestamptz)"
    return (
        "SELECT g.issuer_id, count(*) AS open FROM coverage_gaps g "
        "WHERE g.repaired_at IS NULL "
        f"  AND ($1::timestamptz IS NULL OR {not_after} >= $1) "
        "GROUP BY g.issuer_id"
    )


class CTCoverageMonitor:
    """Exports, from the database, how each configured log is followed and how many
    coverage gaps are open, for the alerts that guard the 15-minute bound."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        logs: Sequence[CTLogConfig],
        registry: IssuerRegistry,
        *,
        interval: float,
        expired_retention: dt.timedelta | None,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.interval = interval
        self.expired_retention = expired_retention
        #: log_id -> configured name (a log is identified by its key, as the follower does)
        self.names: dict[bytes, str] = {}
        for cfg in logs:
            try:
                self.names[LogKey(cfg.public_key).log_id] = cfg.name
            except ValueError:
                log.warning("CT log %s: public key unreadable, not monitored", cfg.name)
        self._with_not_after: bool | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ct-coverage-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.sample(), timeout=max(5.0, self.interval))
            except Exception as exc:  # the database is down: the gauges keep their values
                log.warning("CT coverage metrics not updated: %s", type(exc).__name__)
            await asyncio.sleep(self.interval)

    async def sample(self) -> None:
        """Read the logs' rows and the open gaps once and set the gauges."""
        if self._with_not_after is None:
            self._with_not_after = await ct_index_has_not_after(self.pool)
        rows = {bytes(r["log_id"]): r for r in await self.pool.fetch(_LOGS)}
        for log_id, name in self.names.items():
            row = rows.get(log_id)
            if row is None:  # configured, never polled: no follower has run for it
                metrics.ct_log_seconds_since_update.labels(name).set(math.inf)
                continue
            metrics.ct_log_seconds_since_update.labels(name).set(max(0.0, row["age"]))
            metrics.ct_log_poll_failing.labels(name).set(1 if row["failing"] else 0)
            metrics.ct_log_behind_entries.labels(name).set(
                max(0, row["tree_size"] - row["next_index"])
            )
            if row["lag_seconds"] is not None:
                metrics.ct_lag_seconds.labels(name).set(row["lag_seconds"])
        open_by_id = {
            r["issuer_id"]: r["open"]
            for r in await self.pool.fetch(
                open_gaps_query(self._with_not_after), retired_before(self.expired_retention)
            )
        }
        for issuer in self.registry.issuers:
            metrics.coverage_gaps_open.labels(issuer.name).set(open_by_id.get(issuer.db_id, 0))
