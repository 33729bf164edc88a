"""The background work of a `serve` process: the invalidation listener (always) and the
refresher with its freshness sampler (``refresher = true``, the default)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from responder.config import Config
from responder.invalidation import InvalidationListener
from responder.refresh_store import RefreshStore
from responder.service import ResponderService
from signer.refresher import Refresher, RefresherSettings

log = logging.getLogger(__name__)


def build_refresher(service: ResponderService) -> Refresher:
    """The refresher for this configuration (also used by `ocsp-responder refresh`)."""
    config: Config = service.config
    settings = RefresherSettings(
        interval=config.refresher_interval,
        batch_size=config.refresher_batch_size,
        concurrency=config.refresher_concurrency,
        spread=config.refresher_spread,
        retention=config.expired_retention,
    )
    return Refresher(
        service.registry,
        RefreshStore(service.store.pool, schema=service.store),
        config.policy,
        settings,
    )


class BackgroundTasks:
    """Started after the service, cancelled before it closes."""

    def __init__(self, service: ResponderService) -> None:
        self.service = service
        self.listener = InvalidationListener(
            service.dsn, service.cache, replicas=service.store.replicas
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.service.monitor is not None:  # readiness: no revocations missed
            self.service.monitor.invalidation = self.listener.listening
        self._tasks.append(asyncio.create_task(self.listener.run(), name="invalidation"))
        # serve only once the LISTEN is in place: an instance that answers before it
        # listens could keep a revoked serial's "good" in its cache
        try:
            await asyncio.wait_for(self.listener.listening.wait(), timeout=10)
        except TimeoutError:
            log.warning("invalidation listener not connected yet; it keeps retrying")
        # every worker listens (each has a cache); only worker 0 refreshes
        if self.service.config.refresher and self.service.primary:
            refresher = build_refresher(self.service)
            self._tasks.append(asyncio.create_task(refresher.run_forever(), name="refresher"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
