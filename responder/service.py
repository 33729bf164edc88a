"""Assembling the responder: configuration -> issuers, store, cache, lookup chain, apps.

One ``ResponderService`` per process. ``serve``, the CLI recording commands and the demo
all build it the same way, so they share one code path for signing and storing.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from cryptography.hazmat.primitives.serialization import Encoding

from responder import metrics
from responder.cdn_purge import CdnPurger
from responder.config import Config
from responder.embedded_db import start_embedded_postgres
from responder.health import HealthMonitor, Readiness
from responder.replicas import connect_replicas
from responder.response_cache import SHARED_SUFFIXES, ResponseCache
from responder.schema import check_schema
from responder.signer_expiry import SignerExpiryWatch
from responder.sources import IssuerFilter, LiveSigningSource, build_chain
from responder.store import PresignedStore, StoreUnavailable
from responder.warmup import WarmUp
from signer.issuers import IssuerRegistry
from signer.recording import CertificateRecorder
from signer.revocation import Revoker

log = logging.getLogger(__name__)


def resolve_database_url(config: Config) -> str:
    """The configured database, or an embedded PostgreSQL under ``data_dir``."""
    if config.database_url:
        return config.database_url
    log.warning(
        "no database_url configured: using an embedded PostgreSQL under %s", config.data_dir
    )
    return start_embedded_postgres(config.data_dir)


class ResponderService:
    """Everything one responder process holds, built from the configuration."""

    registry: IssuerRegistry
    store: PresignedStore
    cache: ResponseCache
    chain: IssuerFilter
    live: LiveSigningSource
    recorder: CertificateRecorder
    revoker: Revoker
    purger: CdnPurger
    dsn: str
    monitor: HealthMonitor | None = None

    def __init__(self, config: Config, *, primary: bool = True) -> None:
        self.config = config
        #: with ``serve --workers N`` only worker 0 is primary: it alone runs the admin API
        #: and once-per-deployment background tasks (everything else runs in every worker)
        self.primary = primary
        self.warmup: WarmUp | None = None

    async def start(self, *, pool_size: int = 10, monitor: bool = True) -> None:
        """Load issuers (checking keys), connect, check the schema, register issuers."""
        self.registry = self.config.load_issuers()
        metrics.export_zero_series(issuer.name for issuer in self.registry.issuers)
        dsn = await asyncio.to_thread(resolve_database_url, self.config)
        try:
            self.store = await PresignedStore.connect(dsn, max_size=pool_size)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to the database: {exc}") from exc
        try:
            async with self.store.pool.acquire() as conn:
                await check_schema(conn)
            await self.store.register_issuers(self.registry.issuers)
            if self.config.replica_urls:
                self.store.replicas = await connect_replicas(
                    self.config.replica_urls,
                    self.store.pool,
                    max_size=pool_size,
                    max_lag=self.config.replica_max_lag.total_seconds(),
                )
                self.store.replicas.start()
        except BaseException:
            await self.store.close()
            raise
        policy = self.config.policy
        for issuer in self.registry.issuers:
            for identity in issuer.responders:
                if identity.delegated:
                    SHARED_SUFFIXES.register(identity.certificate.public_bytes(Encoding.DER))
        self.cache = ResponseCache(self.config.cache_size)
        self.chain, self.live = build_chain(
            self.registry,
            self.cache,
            self.store,
            policy,
            signing_concurrency=self.config.signing_concurrency,
            signing_queue_limit=self.config.signing_queue_limit,
            store_lookup_queue_limit=self.config.store_lookup_queue_limit,
            expired_retention=self.config.expired_retention,
        )
        self.recorder = CertificateRecorder(self.registry, self.store, policy)
        self.purger = CdnPurger(
            self.config.cdn_purge,
            attempts=self.config.cdn_purge_attempts,
            timeout=self.config.cdn_purge_timeout.total_seconds(),
        )
        self.revoker = Revoker(
            self.store, policy, cache=self.cache, purger=self.purger, registry=self.registry
        )
        self.dsn = dsn
        if monitor:
            self.monitor = HealthMonitor(
                self.registry,
                self.store,
                self.live,
                refresh_margin=policy.refresh_margin,
                deadline_slack=self.config.refresh_deadline_slack,
                check_interval=self.config.health_check_interval.total_seconds(),
                require_fresh_responses=self.config.readiness_requires_fresh_responses,
                signer_expiry=SignerExpiryWatch(self.registry, policy),
                validity=policy.validity,
            )
            await self.monitor.start()

    async def readiness(self) -> Readiness:
        """Database, signers, fresh responses (see responder/health.py)."""
        if self.monitor is None:
            raise RuntimeError("readiness needs the health monitor (start(monitor=True))")
        return await self.monitor.readiness()

    def start_warmup(self) -> None:
        """Load the hottest responses into this process's cache, in the background."""
        self.warmup = WarmUp(
            self.store,
            self.cache,
            self.config.warmup_responses,
            self.config.policy,
        )
        self.warmup.start()

    async def ready(self) -> tuple[bool, str]:
        """Readiness as (ok, one line), for the OCSP port's /readyz: the health monitor's
        checks, and the warm-up, if running, has had its few seconds (responder/warmup.py)."""
        if self.warmup is not None and self.warmup.holds_readiness():
            return False, "warming up"
        result = await self.readiness()
        return result.ready, result.summary()

    async def close(self) -> None:
        if self.warmup is not None:
            await self.warmup.stop()
        if hasattr(self, "live"):
            await self.live.drain()
        if hasattr(self, "purger"):
            await self.purger.aclose()
        if self.monitor is not None:
            await self.monitor.stop()
        await self.store.close()
