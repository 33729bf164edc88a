"""Cross-instance cache invalidation: PostgreSQL LISTEN/NOTIFY.

A revocation commits its row, its revoked response and a ``NOTIFY ocsp_invalidations,
'<issuer id>:<serial hex>'`` in one transaction (``store.record_revocation``); PostgreSQL
delivers the notification to every listening session at commit. Each responder process
keeps one dedicated connection (outside the pool) that LISTENs and drops the serial from
its in-process cache, so every instance stops serving the old answer within
milliseconds of the commit (the requirement is 1 s).

Notifications sent while a listener is disconnected are lost, so after any loss the
listener reconnects (with backoff) and clears its whole cache once it listens again: the
next requests re-read the store. A silent network loss is found by a periodic
``SELECT 1`` on the listening connection.

While the listener is disconnected (and before its first LISTEN) the cache is kept but
not trusted (``ResponseCache.invalidations_heard``): every lookup reads the store, and a
cached answer is served only when the store cannot be read (CacheSource), since answering
from memory is what keeps the service up through a database outage (issue: resilience).
So a revocation acknowledged while the listener is away (its backend terminated, a
reconnection backing off) is answered from the store at once. What remains: a partition
that cuts this instance off from a primary the others still reach, or a notification lost
in a crash right after its commit, serves the cache until the listener reconnects (then
it is cleared); the CDN purge hook covers the edge. See docs/deploy.md ("Revocation").
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from responder import metrics
from responder.replicas import ReplicaSet
from responder.response_cache import ResponseCache
from responder.store import INVALIDATION_CHANNEL, parse_invalidation_payload, serial_key

log = logging.getLogger(__name__)

#: the listening session's application_name (visible in pg_stat_activity)
APPLICATION_NAME = "ocsp-responder invalidation listener"


class InvalidationListener:
    def __init__(
        self,
        dsn: str,
        cache: ResponseCache,
        *,
        probe_interval: float = 5.0,
        max_backoff: float = 5.0,
        replicas: ReplicaSet | None = None,
    ) -> None:
        self.dsn = dsn
        self.cache = cache
        #: read replicas to keep off a changed serial until they replayed the change
        self.replicas = replicas
        self.probe_interval = probe_interval
        self.max_backoff = max_backoff
        #: set while a LISTEN is in place (tests and readiness may wait for it)
        self.listening = asyncio.Event()
        # until the first LISTEN, and whenever it is lost, the cache may miss revocations
        cache.invalidations_heard = False

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            issuer_id, serial = parse_invalidation_payload(str(payload))
        except ValueError:
            log.warning("invalidation: ignoring malformed payload %r", payload)
            return
        if self.replicas is not None:
            # first: a lookup after this must not re-read the old row from a replica
            self.replicas.pin_now(issuer_id, serial_key(serial))
        dropped = self.cache.drop_serial(issuer_id, serial)
        metrics.cache_invalidations_total.inc(dropped)

    async def run(self) -> None:
        """Listen forever; reconnect after any loss and clear the cache then."""
        backoff = 0.1
        first = True
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=10, server_settings={"application_name": APPLICATION_NAME}
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(INVALIDATION_CHANNEL, self._on_notification)
                # Notifications may have been missed before this LISTEN: while we were
                # away, or (the first time) if serving began before it was in place
                # (serve waits for it at most 10 s). The first time the cache is usually
                # still empty and the clear costs nothing.
                self.cache.clear()
                if self.replicas is not None:
                    # the first time too: a revocation acknowledged before this process
                    # listened sent its notification to nobody here, and a lagging replica
                    # still holds the "good" it replaced
                    self.replicas.pin_everything_now()
                if not first:
                    metrics.invalidation_listener_reconnects_total.inc()
                    log.warning("invalidation: listener reconnected; cache cleared")
                first = False
                backoff = 0.1
                self.listening.set()
                self.cache.invalidations_heard = True
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=self.probe_interval)
                    except TimeoutError:
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("invalidation: listener connection lost: %r", exc)
            finally:
                self.listening.clear()
                self.cache.invalidations_heard = False
                if self.replicas is not None:
                    # the store is read meanwhile: from the primary, a replica may lag
                    self.replicas.hold_everything()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
