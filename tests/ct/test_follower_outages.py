"""The follower rides out PostgreSQL outages, including one at its own start.

Inside ``serve`` (``ct_follow_in_serve = true``) the follower task registered its logs once
at start; if the database was unreachable at that moment (a restart or failover while the
instance started) the task ended with "the CT follower stopped; serving continues without
it" and never followed again: every lost recording published afterwards stayed
``unauthorized`` until the next restart of ``serve``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal

from responder.config import CTLogConfig
from responder.ct_indexer import BackgroundFollower, CTIndexer
from responder.schema import migrate
from responder.store import PresignedStore
from signer.demo_ca import DemoCA
from signer.response_builder import ValidityPolicy
from tests.pgcluster import PgCluster

from .fakelog import FakeLog, FakeLogServer
from .index_support import (
    FAST,
    connect,
    now_ms,
    precert_and_tbs,
    signing_registry,
    spki_sha256,
    wait_until,
)


def add_lost_precert(log: FakeLog, ca: DemoCA, serial: int) -> None:
    pre, tbs = precert_and_tbs(ca, "o.test", serial)
    log.add_precert(spki_sha256(ca.ca_cert), tbs, pre, [], now_ms())
    log.publish()


async def follower_on(
    cluster: PgCluster, server: FakeLogServer, ca: DemoCA
) -> tuple[PresignedStore, CTIndexer, BackgroundFollower]:
    """A follower of ``server``'s log (polled every 0.2 s) on a fresh database of ``cluster``."""
    cluster.psql("CREATE DATABASE ct")
    dsn = cluster.dsn("ct")
    await migrate(dsn)
    registry = signing_registry({"ctca": ca})
    store = await connect(dsn, registry)
    cfg = CTLogConfig(
        name="o",
        url=server.url,
        kind="static",
        public_key=server.log.public_key_pem.decode(),
        poll_interval=dt.timedelta(seconds=0.2),
        origin=server.log.origin,
    )
    indexer = CTIndexer([cfg], registry, store.pool, ValidityPolicy(), retry=FAST)
    return store, indexer, BackgroundFollower(indexer)


async def test_follower_started_while_the_database_is_down_follows_once_it_is_back(
    own_cluster: PgCluster, fake_server: FakeLogServer, fake_log: FakeLog, ct_ca: DemoCA
) -> None:
    add_lost_precert(fake_log, ct_ca, 0x7B01)
    store, _, follower = await follower_on(own_cluster, fake_server, ct_ca)

    async def repaired() -> bool:
        try:
            n = await store.pool.fetchval(
                "SELECT count(*) FROM coverage_gaps WHERE repaired_at IS NOT NULL"
            )
        except Exception:
            return False
        return bool(n)

    try:
        own_cluster.stop("immediate")
        follower.start()
        await asyncio.sleep(1.0)  # its start meets the outage
        own_cluster.start()
        await wait_until(repaired, timeout=30, what="the first lost precert to be repaired")
        # and an outage while it follows: entries published meanwhile are not skipped
        own_cluster.stop("immediate")
        add_lost_precert(fake_log, ct_ca, 0x7B02)
        await asyncio.sleep(1.0)
        own_cluster.start()

        async def both() -> bool:
            try:
                n = await store.pool.fetchval(
                    "SELECT count(*) FROM coverage_gaps g JOIN responses r "
                    "USING (issuer_id, serial) WHERE g.repaired_at IS NOT NULL"
                )
            except Exception:
                return False
            return n == 2

        await wait_until(both, timeout=30, what="the second lost precert to be repaired")
    finally:
        await follower.stop()
        await store.close()


async def test_follower_stopped_while_registering_its_logs_closes_its_client(
    own_cluster: PgCluster, fake_server: FakeLogServer, fake_log: FakeLog, ct_ca: DemoCA
) -> None:
    """serve stopped while the follower registered its logs against a hung database (a
    stalled disk, a partition) cancelled it before the try that closes the shared HTTP
    client: the client, and its connections to the logs, were left open."""
    store, indexer, follower = await follower_on(own_cluster, fake_server, ct_ca)
    pids = own_cluster.server_pids()
    own_cluster.signal_all(pids, signal.SIGSTOP)  # hung: the registration's query waits
    try:
        follower.start()

        async def built() -> bool:
            return indexer.http is not None

        await wait_until(built, what="the follower's HTTP client")
        client = indexer.http
        assert client is not None
        await asyncio.sleep(0.3)  # inside the registration's query
        stopping = asyncio.create_task(follower.stop())  # cancels the registration
        await asyncio.sleep(0.3)
        own_cluster.signal_all(pids, signal.SIGCONT)  # (asyncpg's cancel request needs the server)
        await asyncio.wait_for(stopping, 10)
        assert client.is_closed and indexer.http is None
    finally:
        own_cluster.signal_all(pids, signal.SIGCONT)
        await store.close()
