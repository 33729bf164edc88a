"""Warm-up: load the hottest pre-signed responses into the in-process cache at start.

Relying parties mostly ask about recently issued certificates, whose responses are the
most recently signed. Each worker (its cache is its own) reads the ``warmup_responses``
rows with the latest nextUpdate in batches, in the background: the listener answers
from the first moment (misses fall through to PostgreSQL), and /readyz waits for the
warm-up at most ``READY_WAIT`` seconds so a slow warm-up never holds a deployment back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

from responder.response_cache import ResponseCache, ServedResponse, cache_key
from responder.store import PresignedStore, StoredResponse
from signer.response_builder import ValidityPolicy, renewal_point

log = logging.getLogger(__name__)

#: /readyz reports "warming up" for at most this many seconds after start.
READY_WAIT = 5.0


class WarmUp:
    """One background load of the most recent responses into ``cache``."""

    def __init__(
        self, store: PresignedStore, cache: ResponseCache, limit: int, policy: ValidityPolicy
    ) -> None:
        self.store = store
        self.cache = cache
        self.limit = min(limit, cache.max_entries)
        self.policy = policy
        self.loaded = 0
        self.started = time.monotonic()
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin loading in the background (returns at once)."""
        if self.limit <= 0:
            self.done.set()
            return
        self._task = asyncio.create_task(self._run(), name="warm-up")

    def holds_readiness(self) -> bool:
        """True while readiness should wait: loading, and started < READY_WAIT s ago."""
        return not self.done.is_set() and time.monotonic() - self.started < READY_WAIT

    async def _run(self) -> None:
        # The rows come from one snapshot, taken after this moment. A revocation committed
        # after it is not in the rows, and its invalidation may arrive while a batch is on
        # its way: putting that batch as read would cache the "good" the revocation
        # replaced. So the serials invalidated from now on are skipped (read on demand
        # instead), and a whole-cache clear (the listener reconnected: anything may have
        # been missed) stops the warm-up.
        dropped = self.cache.watch_drops()
        clears = self.cache.clears
        try:
            async with contextlib.aclosing(self.store.recent_responses(self.limit)) as batches:
                async for batch in batches:
                    if self.cache.clears != clears:
                        log.info(
                            "warm-up stopped after %d responses: the cache was cleared (the "
                            "invalidation listener reconnected); the rest is read on demand",
                            self.loaded,
                        )
                        break
                    self._put(batch, dropped)
                    await asyncio.sleep(0)  # let requests in between batches
            # The cache now holds most of this process's long-lived objects. Move them out
            # of the cyclic collector's reach (gc.freeze): otherwise every full collection
            # walks them all again, a pause of ~18 ms per 100,000 entries here that lands
            # on whichever requests are in flight (p99, max). Entries cached later are
            # still collected normally.
            gc.freeze()
            log.info(
                "warm-up: %d responses in memory after %.1fs (%d objects frozen out of the "
                "cyclic GC)",
                self.loaded,
                time.monotonic() - self.started,
                gc.get_freeze_count(),
            )
        except Exception as exc:
            log.warning("warm-up stopped: %s: %s", type(exc).__name__, exc)
        finally:
            self.cache.unwatch()
            self.done.set()

    def _put(
        self, batch: list[tuple[int, int, StoredResponse]], dropped: set[tuple[int, int]]
    ) -> None:
        now = time.time()
        for issuer_id, serial, row in batch:
            # the serving path's renewal point exactly (StoreSource): a longer response
            # renews at its BR deadline if that comes first, a capped one (an expiring
            # signer) at its BR deadline; nextUpdate - margin would skip every capped row
            renew_at = renewal_point(row.this_update, row.next_update, self.policy)
            if now >= renew_at or (issuer_id, serial) in dropped:
                continue
            key = cache_key(issuer_id, serial, "sha1")
            if self.cache.get(key) is None:  # never replace a newer answer
                self.cache.put(
                    key,
                    ServedResponse.build(
                        row.der, row.status, row.this_update, row.next_update, renew_at
                    ),
                )
                self.loaded += 1

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
