"""A database outage: a cached answer past its renewal point is still served until its
nextUpdate (it was tryLater as soon as it crossed the renewal point), never after.

The lookup chain as `serve` builds it, on a real ResponderService and its own PostgreSQL
cluster, which is stopped mid-test.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from responder.config import load_config
from responder.protocol import parse_request
from responder.response_cache import cache_key
from responder.service import ResponderService
from responder.sources import Unavailable
from tests.pgcluster import PgCluster
from tests.support import IssuerFiles, build_request, create_database, write_config


def test_cached_answer_due_for_renewal_is_served_through_an_outage(
    own_cluster: PgCluster, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    dsn = create_database(own_cluster.dsn())
    config = load_config(write_config(tmp_path, dsn, [p256_issuer]).config_path, {})
    cert = p256_issuer.ca.issue_leaf("outage.test")
    request = parse_request(build_request(cert, p256_issuer.ca.ca_cert))

    async def run() -> None:
        service = ResponderService(config)
        await service.start(pool_size=2, monitor=False)
        try:
            await service.recorder.record([cert])
            first = await service.chain.response(request)
            assert first.source == "store"
            issuer = service.registry.issuers[0]
            entry = service.cache.get(cache_key(issuer.db_id, cert.serial_number, "sha1"))
            assert entry is not None and entry.der == first.response.der
            entry.renew_at = int(time.time()) - 1  # due for renewal: the store is asked
            own_cluster.stop("immediate")
            answer = await service.chain.response(request)  # was: Unavailable (tryLater)
            assert answer.source == "cache" and answer.response.der == first.response.der
            entry.next_update = int(time.time()) - 1  # past nextUpdate: never served
            with pytest.raises(Unavailable):
                await service.chain.response(request)
            entry.next_update = int(time.time()) + 3600
            assert (await service.chain.response(request)).source == "cache"
            service.cache.drop_serial(issuer.db_id, cert.serial_number)  # a revocation
            with pytest.raises(Unavailable):
                await service.chain.response(request)
        finally:
            service.store.pool.terminate()

    asyncio.run(run())
