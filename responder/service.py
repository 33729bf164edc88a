"""Assembling the responder: configuration -> issuers, store, cache, lookup chain, apps.

One ``ResponderService`` per process. ``serve``, the CLI recording commands and the demo
all build it the same way, so they share one code path for signing and storing.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from responder.config import Config
from responder.embedded_db import start_embedded_postgres
from responder.response_cache import ResponseCache
from responder.schema import check_schema
from responder.sources import IssuerFilter, LiveSigningSource, build_chain
from responder.store import PresignedStore, StoreUnavailable
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

    def __init__(self, config: Config) -> None:
        self.config = config

    async def start(self, *, pool_size: int = 10) -> None:
        """Load issuers (checking keys), connect, check the schema, register issuers."""
        self.registry = self.config.load_issuers()
        dsn = await asyncio.to_thread(resolve_database_url, self.config)
        try:
            self.store = await PresignedStore.connect(dsn, max_size=pool_size)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to the database: {exc}") from exc
        try:
            async with self.store.pool.acquire() as conn:
                await check_schema(conn)
            await self.store.register_issuers(self.registry.issuers)
        except BaseException:
            await self.store.close()
            raise
        policy = self.config.policy
        self.cache = ResponseCache(self.config.cache_size)
        self.chain, self.live = build_chain(
            self.registry,
            self.cache,
            self.store,
            policy,
            signing_concurrency=self.config.signing_concurrency,
            signing_queue_limit=self.config.signing_queue_limit,
        )
        self.recorder = CertificateRecorder(self.registry, self.store, policy)
        self.revoker = Revoker(self.store, policy)

    async def ready(self) -> tuple[bool, str]:
        """Readiness: the database answers within a second."""
        try:
            await asyncio.wait_for(self.store.pool.fetchval("SELECT 1"), timeout=1.0)
        except Exception as exc:
            return False, f"database unreachable: {type(exc).__name__}"
        return True, "ready"

    async def close(self) -> None:
        await self.store.close()
