"""A database that hangs (stalled storage, a partition that drops packets): a store lookup
is given up after ``wait_deadline`` and answered tryLater, instead of after asyncpg's
command timeout plus its cancel request (~20 s, long after any relying party gave up);
readiness's 1 s database probe likewise (it took ~11 s).

A real PostgreSQL whose processes are stopped with SIGSTOP (they keep their sockets open
and answer nothing), and the chain as `serve` builds it.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from responder.config import load_config
from responder.protocol import parse_request
from responder.service import ResponderService
from responder.sources import Unavailable
from responder.store import PresignedStore
from responder.store_lookup import BatchedLookup, LookupTimedOut
from tests.pgcluster import PgCluster
from tests.support import IssuerFiles, build_request, create_database, write_config


def test_a_hung_database_is_given_up_after_the_deadline(
    own_cluster: PgCluster, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    dsn = create_database(own_cluster.dsn())
    config = load_config(write_config(tmp_path, dsn, [p256_issuer]).config_path, {})
    request = parse_request(build_request(None, p256_issuer.ca.ca_cert, serial=12345))

    async def run() -> None:
        store = await PresignedStore.connect(dsn, min_size=1, max_size=2)
        lookup = BatchedLookup(store, wait_deadline=1.0)
        service = ResponderService(config)
        await service.start(pool_size=2)
        assert not (await lookup.get(1, 5)).knowledge.known  # answers while it runs
        pids = own_cluster.server_pids()
        own_cluster.signal_all(pids, signal.SIGSTOP)
        try:
            # the 15 s guard only bounds the test: asyncpg alone takes ~20 s here
            with pytest.raises(LookupTimedOut):
                await asyncio.wait_for(lookup.get(1, 6), 15)
            with pytest.raises(Unavailable):  # the chain's tryLater
                await asyncio.wait_for(service.chain.response(request), 15)
            # readiness says so within its probe's second, not after asyncpg's ~10 s
            readiness = await asyncio.wait_for(service.readiness(), 5)
            assert readiness.checks["database"] == {
                "ok": False,
                "detail": "unreachable: TimeoutError",
            }
        finally:
            own_cluster.signal_all(pids, signal.SIGCONT)
        store.pool.terminate()
        if service.monitor is not None:
            await service.monitor.stop()
        service.store.pool.terminate()

    asyncio.run(run())
