"""Liveness, readiness, and the gauges sampled off the hot path.

Readiness (``/readyz``) is true when all four hold:

- **database**: ``SELECT 1`` answers within ``READY_DB_TIMEOUT`` seconds;
- **signers**: every issuer has a responder identity valid now whose start-up signature
  was verified (``ResponderIdentity.verified_at``, set by ``make_responder``);
- **responses**: no stored response is past its refresh deadline. A response for a
  certificate that has not expired (or a revocation without a certificate record) is past
  its deadline when ``now > next_update - refresh_margin + refresh_deadline_slack`` (a
  response capped by an expiring signer certificate: its BR deadline + the slack, as the
  refresher reckons it): it should have been re-signed ``refresh_margin`` before
  nextUpdate and the refresher has had ``refresh_deadline_slack`` more (default: 6h, at most a quarter of the margin; it
  must be shorter than the margin, so this fires while responses are still valid). The
  count is a cheap indexed query (``responses_next_update``) run every
  ``health_check_interval`` and exported as ``ocsp_responses_overdue_refresh`` (the
  refresher exports its own BR-deadline count as ``ocsp_responses_past_refresh_deadline``).
  With ``readiness_requires_fresh_responses = false`` it is exported but does not affect
  readiness (every instance shares the database, so they would all go not-ready at once).
- **invalidation** (in ``serve``): the invalidation listener is connected and LISTENs, so
  a revocation committed through any instance drops this process's cached copy. A
  listener that cannot reconnect while the pool still works (connection limits, a
  terminated session) left cached "good" answers of revoked serials served by a "ready"
  instance until it got back.

Liveness (``/healthz``) only says the event loop answers. The monitor also samples the
database pool and on-demand signing queue gauges every ``SAMPLE_INTERVAL`` seconds, so the
hot path never touches them, and evaluates readiness every ``health_check_interval`` so
that ``ocsp_ready`` is current whether or not anything probes ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from responder import metrics
from responder.refresh_store import overdue_query
from responder.signer_expiry import SignerExpiryWatch
from responder.sources import LiveSigningSource
from responder.store import MAX_CERTIFICATE_LIFETIME, PresignedStore
from signer.issuers import IssuerConfigError, IssuerRegistry

log = logging.getLogger(__name__)

READY_DB_TIMEOUT = 1.0
SAMPLE_INTERVAL = 5.0


@dataclass
class Readiness:
    ready: bool
    checks: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the OCSP port's plain-text /readyz."""
        replicas = self.checks.get("replicas")
        if self.ready:
            return "ready" + (f"; {replicas['detail']}" if replicas else "")
        failing = [f"{k}: {v['detail']}" for k, v in self.checks.items() if not v["ok"]]
        return "not ready: " + "; ".join(failing)


async def _within(probe: Coroutine[Any, Any, Any], timeout: float) -> Any:
    """``probe``'s result, or TimeoutError after ``timeout`` seconds without waiting for
    the probe to wind down: asyncio.wait_for waits for the cancelled query, and asyncpg's
    cancellation of a query to a hung database takes ~10 s (readiness answered after 11 s
    instead of 1)."""
    task = asyncio.ensure_future(probe)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()  # it ends in the background; whatever it raises then is expected
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise TimeoutError(f"no answer in {timeout:g} s")
    return task.result()


class HealthMonitor:
    """Periodic checks and gauge samples for one responder process."""

    def __init__(
        self,
        registry: IssuerRegistry,
        store: PresignedStore,
        live: LiveSigningSource,
        *,
        refresh_margin: dt.timedelta,
        deadline_slack: dt.timedelta,
        check_interval: float,
        require_fresh_responses: bool = True,
        signer_expiry: SignerExpiryWatch | None = None,
        validity: dt.timedelta = dt.timedelta(days=4),
    ) -> None:
        self.registry = registry
        self.store = store
        self.live = live
        self.refresh_margin = refresh_margin
        self.deadline_slack = deadline_slack
        self.check_interval = check_interval
        self.require_fresh_responses = require_fresh_responses
        self.signer_expiry = signer_expiry
        #: response_validity: a shorter (capped) response is due at its BR deadline
        self.validity = validity
        self.past_deadline: int | None = None  # None: not known (the query failed)
        #: set while the invalidation listener LISTENs (responder/background.py wires it):
        #: without it, revocations made through other instances do not reach this cache
        self.invalidation: asyncio.Event | None = None
        self.past_deadline_error = "not checked yet"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Run the first checks now (readiness is known from the start), then periodically."""
        await self.check_responses()
        self.sample()
        if self.signer_expiry is not None:
            self.signer_expiry.check()
        self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        next_check = time.monotonic() + self.check_interval
        ready_known = False
        while True:
            await asyncio.sleep(min(SAMPLE_INTERVAL, self.check_interval))
            try:
                self.sample()
                if not ready_known and time.monotonic() < next_check:
                    # ocsp_ready starts at 0: unless a /readyz probe happened to reach
                    # this worker it said "not ready" for a whole check_interval after
                    # start (30 s by default, a page after a restart with a longer one).
                    # Not in start(): the invalidation listener is wired only after it.
                    await self.readiness()
                ready_known = True
                if time.monotonic() >= next_check:
                    if self.signer_expiry is not None:
                        self.signer_expiry.check()
                    await self.check_responses()
                    # ocsp_ready must not depend on someone probing /readyz: a worker the
                    # load balancer never reached, or an instance nobody probes, kept 0
                    # (a false "not ready" page), and a probed one kept its last value
                    await self.readiness()
                    next_check = time.monotonic() + self.check_interval
            except Exception:  # a monitoring bug must not stop monitoring for good
                log.exception("health monitor iteration failed")

    def sample(self) -> None:
        """Pool and queue gauges: cheap in-process reads."""
        pool = self.store.pool
        size, idle = pool.get_size(), pool.get_idle_size()
        gauge = metrics.db_pool_connections
        gauge.labels("main", "open").set(size)
        gauge.labels("main", "idle").set(idle)
        gauge.labels("main", "in_use").set(size - idle)
        gauge.labels("main", "max").set(pool.get_max_size())
        metrics.signing_queue_depth.set(self.live.waiting)
        if self.live.lookup is not None:
            metrics.store_lookup_queue_depth.set(self.live.lookup.waiting)

    async def check_responses(self) -> None:
        """Count stored responses past their refresh deadline (see the module docstring)."""
        now = dt.datetime.now(dt.UTC)
        threshold = now + self.refresh_margin - self.deadline_slack
        try:
            count = await asyncio.wait_for(
                # certificates not yet expired: the refresher's reckoning with no retention
                self.store.pool.fetchval(
                    overdue_query(self.store.ct_not_after, self.store.this_update_index),
                    threshold,
                    now,
                    dt.timedelta(0),
                    MAX_CERTIFICATE_LIFETIME,
                    self.refresh_margin,
                    self.validity,
                    self.deadline_slack,
                ),
                timeout=5.0,
            )
        except Exception as exc:
            self.past_deadline = None
            self.past_deadline_error = f"check failed: {type(exc).__name__}"
            return
        self.past_deadline = int(count)
        metrics.responses_overdue_refresh.set(self.past_deadline)
        if self.past_deadline:
            log.error("%d stored responses are past their refresh deadline", self.past_deadline)

    def signer_checks(self) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        out: dict[str, Any] = {}
        for issuer in self.registry.issuers:
            try:
                identity = issuer.active_responder(now)
            except IssuerConfigError as exc:
                out[issuer.name] = {"ok": False, "detail": str(exc)}
                continue
            verified = identity.verified_at
            out[issuer.name] = {
                "ok": verified is not None,
                "detail": f"signature verified at {verified:%Y-%m-%dT%H:%M:%SZ}"
                if verified
                else "start-up signature not verified",
            }
        return out

    async def readiness(self) -> Readiness:
        checks: dict[str, Any] = {}
        try:
            await _within(self.store.pool.fetchval("SELECT 1"), READY_DB_TIMEOUT)
            checks["database"] = {"ok": True, "detail": "reachable"}
        except Exception as exc:
            checks["database"] = {"ok": False, "detail": f"unreachable: {type(exc).__name__}"}
        if checks["database"]["ok"] and self.past_deadline is None:
            await self.check_responses()  # the database is back: do not wait a whole interval
        signers = self.signer_checks()
        bad = [name for name, c in signers.items() if not c["ok"]]
        checks["signers"] = {
            "ok": not bad,
            "detail": "all verified" if not bad else "unusable: " + ", ".join(bad),
            "issuers": signers,
        }
        if self.past_deadline is None:
            fresh = {"ok": False, "detail": self.past_deadline_error}
        else:
            fresh = {
                "ok": self.past_deadline == 0,
                "detail": f"{self.past_deadline} responses past their refresh deadline",
            }
        if not self.require_fresh_responses:
            fresh = {**fresh, "ok": True, "enforced": False}
        checks["responses"] = fresh
        if self.invalidation is not None:
            listening = self.invalidation.is_set()
            checks["invalidation"] = {
                "ok": listening,
                "detail": "listening"
                if listening
                else "listener not connected: revocations made elsewhere may not reach this cache",
            }
        if self.store.replicas is not None:
            # informational: lookups fall back to the primary, so this never blocks readiness
            replicas = self.store.replicas
            checks["replicas"] = {
                "ok": True,
                "detail": replicas.ready_detail(),
                "healthy": sum(r.healthy for r in replicas.replicas),
                "configured": len(replicas.replicas),
            }
        ready = all(c["ok"] for c in checks.values())
        metrics.readiness_ready.set(1 if ready else 0)
        return Readiness(ready, checks)
