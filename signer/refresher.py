"""The refresher: re-sign stored responses before BR 4.9.9 requires a new one.

It runs inside ``serve`` (``refresher = true``) and as ``ocsp-responder refresh`` (one
pass). A pass works issuer by issuer with ``concurrency`` workers; each worker claims a
batch of due rows in one short transaction (``FOR UPDATE SKIP LOCKED``, see
``responder/refresh_store.py``), signs it in a worker thread (the event loop keeps
serving), writes it back and commits. Several instances and restarts are safe: a row is
claimed by one refresher at a time, an interrupted batch rolls back and comes due again.

Two reasons make a row due:

- time: the renewal point (``signer.response_builder.renewal_point``) minus a per-serial
  jitter in ``spread * (0.25 .. 1)``, so work arrives spread out and is done before the
  serving path would have to sign on demand;
- rollover: the row was signed by a responder certificate of its issuer that is no longer
  the active one (or by an unknown one: rows from before signers were recorded). These
  are re-signed at most ``concurrency`` batches per pass, so a rollover of millions of
  rows is a steady background load rather than a storm.

A revoked row is always re-signed revoked (status from the ``revocations`` table, and the
UPDATE refuses good-over-revoked). If an issuer's responder refuses to sign (its
certificate expires too soon: ``SigningError``) the issuer is skipped for the pass, the
failure is counted and logged; the serving path keeps answering with the still-valid
bytes until their nextUpdate, then ``tryLater`` (README: "Freshness").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import asyncpg

from responder import metrics
from responder.refresh_store import (
    AGE_SAMPLE_ROWS,
    MAX_BACKDATE,
    DueResponse,
    Freshness,
    RefreshStore,
    SignerSet,
    Window,
)
from responder.store import StoreUnavailable
from signer.issuers import Issuer, IssuerConfigError, IssuerRegistry
from signer.response_builder import (
    CertStatus,
    SignedResponse,
    SigningError,
    ValidityPolicy,
    sign_response,
)

log = logging.getLogger(__name__)

#: what a database outage raises into a refresher pass (connect refused/reset, the pool's
#: timeouts, a backend terminated mid-statement, the store's exhausted retries)
DATABASE_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    StoreUnavailable,
)


@dataclass(frozen=True, slots=True)
class RefresherSettings:
    interval: dt.timedelta = dt.timedelta(seconds=60)
    batch_size: int = 200
    concurrency: int = 2
    spread: dt.timedelta = dt.timedelta(hours=1)
    retention: dt.timedelta = dt.timedelta(days=7)


@dataclass
class PassReport:
    """What one pass did: re-signed rows by reason, failures by issuer."""

    resigned: Counter[str] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.resigned.values())


class _IssuerFailed(Exception):
    """Signing for this issuer is refused: stop its workers for this pass."""


class Refresher:
    def __init__(
        self,
        registry: IssuerRegistry,
        store: RefreshStore,
        policy: ValidityPolicy,
        settings: RefresherSettings,
    ) -> None:
        self.registry = registry
        self.store = store
        self.policy = policy
        self.settings = settings

    def _window(self) -> Window:
        return Window(
            now=dt.datetime.now(dt.UTC),
            policy=self.policy,
            spread=self.settings.spread,
            retention=self.settings.retention,
        )

    @staticmethod
    def stale_signers(issuer: Issuer, now: dt.datetime) -> SignerSet:
        """The issuer's configured responders other than the active one, and the rule for
        responders no longer configured (replaced in place: ``SignerSet``)."""
        active = issuer.active_responder(now)
        return SignerSet(
            stale=[r.fingerprint64 for r in issuer.responders if r is not active],
            active=active.fingerprint64,
            known=[r.fingerprint64 for r in issuer.responders],
            older_than=active.not_before - MAX_BACKDATE,
        )

    async def run_pass(self) -> PassReport:
        """Re-sign everything due now (all of it) and a bounded share of rollover work."""
        report = PassReport()
        for issuer in self.registry.issuers:
            try:
                stale = self.stale_signers(issuer, dt.datetime.now(dt.UTC))
            except IssuerConfigError as exc:
                # no responder valid now: nothing of this issuer can be re-signed; say so
                # as loudly as a refused signature (_batch) instead of only in the summary
                metrics.refresher_failures_total.labels(issuer.name, "signing").inc()
                log.error("refresher: issuer %s: signing refused: %s", issuer.name, exc)
                report.failures[issuer.name] = str(exc)
                continue
            try:
                await self._issuer_pass(issuer, stale, report)
            except _IssuerFailed as exc:
                report.failures[issuer.name] = str(exc)
        return report

    async def _issuer_pass(self, issuer: Issuer, stale: SignerSet, report: PassReport) -> None:
        async def due_worker() -> None:
            while True:
                n = await self._batch(issuer, report, "due", None)
                if n < self.settings.batch_size:
                    return

        async def rollover_worker() -> None:
            await self._batch(issuer, report, "rollover", stale)

        workers = range(self.settings.concurrency)
        for worker in (due_worker, rollover_worker):
            results = await asyncio.gather(*(worker() for _ in workers), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def _batch(
        self, issuer: Issuer, report: PassReport, reason: str, stale: SignerSet | None
    ) -> int:
        signed_count = 0

        async def sign(rows: list[DueResponse]) -> list[SignedResponse | None]:
            nonlocal signed_count
            signed = await asyncio.to_thread(self._sign_rows, issuer, rows)
            signed_count = sum(1 for s in signed if s is not None)
            return signed

        try:
            claimed = await self.store.refresh_batch(
                issuer.db_id, self._window(), self.settings.batch_size, sign, stale_signers=stale
            )
        except SigningError as exc:
            metrics.refresher_failures_total.labels(issuer.name, "signing").inc()
            log.error("refresher: issuer %s: signing refused: %s", issuer.name, exc)
            raise _IssuerFailed(str(exc)) from exc
        except Exception as exc:
            metrics.refresher_failures_total.labels(issuer.name, type(exc).__name__).inc()
            log.warning("refresher: issuer %s: batch failed: %r", issuer.name, exc)
            raise _IssuerFailed(f"{type(exc).__name__}: {exc}") from exc
        if signed_count:
            report.resigned[reason] += signed_count
            metrics.refresher_resigned_total.labels(issuer.name, reason).inc(signed_count)
        return claimed

    def _sign_rows(self, issuer: Issuer, rows: list[DueResponse]) -> list[SignedResponse | None]:
        """CPU only (runs in a worker thread). A row stored revoked without a revocation
        record is left alone rather than ever turned good."""
        out: list[SignedResponse | None] = []
        for row in rows:
            if row.revocation is None and row.status is CertStatus.REVOKED:
                log.error("refresher: serial %x stored revoked without a revocation", row.serial)
                out.append(None)
                continue
            status = CertStatus.REVOKED if row.revocation is not None else CertStatus.GOOD
            out.append(
                sign_response(issuer, row.serial, status, self.policy, revocation=row.revocation)
            )
        return out

    async def sample(self) -> Freshness:
        """Export backlog, rows past their BR deadline and the age distribution."""
        now = dt.datetime.now(dt.UTC)
        stale: dict[int, SignerSet] = {}
        for issuer in self.registry.issuers:
            try:
                stale[issuer.db_id] = self.stale_signers(issuer, now)
            except IssuerConfigError:
                stale[issuer.db_id] = SignerSet([r.fingerprint64 for r in issuer.responders])
        fresh = await self.store.freshness(self._window(), stale, AGE_SAMPLE_ROWS)
        metrics.refresher_backlog.set(fresh.backlog)
        metrics.responses_past_refresh_deadline.set(fresh.past_deadline)
        for quantile, age in fresh.age_quantiles.items():
            metrics.stored_response_age_seconds.labels(quantile).set(age)
        return fresh

    async def run_forever(self) -> None:
        """Pass, sample, sleep ``interval`` +-25% (instances drift apart), forever."""
        while True:
            try:
                report = await self.run_pass()
                if report.total or report.failures:
                    log.info(
                        "refresher: re-signed %s; failures: %s",
                        dict(report.resigned),
                        report.failures or "none",
                    )
                await self.sample()
            except asyncio.CancelledError:
                raise
            except DATABASE_DOWN as exc:
                # an outage, not a bug: one line naming it, no traceback every interval
                log.error("refresher pass failed: database: %s: %s", type(exc).__name__, exc)
            except Exception:
                log.exception("refresher pass failed")
            seconds = self.settings.interval.total_seconds()
            await asyncio.sleep(seconds * random.uniform(0.75, 1.25))
