"""The hot path's building blocks: parse memo, compact cache entries, local metrics,
health paths before the OCSP GET prefix, warm-up."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import REGISTRY

from responder.answer_stats import AnswerStats
from responder.protocol import MalformedRequest, ParsedRequests
from responder.response_cache import SharedSuffixes, cache_key
from signer.demo_ca import DemoCA
from tests.support import IssuerFiles, ResponderProcess, build_request, get_url, write_config


def test_parse_memo_is_exact_and_bounded(demo_ca: DemoCA) -> None:
    parsed = ParsedRequests(max_entries=2)
    ders = [build_request(None, demo_ca.ca_cert, serial=s) for s in (1, 2, 3)]
    first = parsed.from_body(ders[0])
    assert parsed.from_body(ders[0]) is first  # parsed once
    parsed.from_body(ders[1])
    parsed.from_body(ders[2])  # evicts the oldest
    assert parsed.from_body(ders[0]) is not first
    assert parsed.from_body(ders[0]) == first
    for _ in range(2):  # malformed input is refused every time, never remembered
        with pytest.raises(MalformedRequest):
            parsed.from_body(ders[0] + b"\x00")
    assert len(parsed._post) == 2


def test_cache_keys_are_distinct() -> None:
    keys = {
        cache_key(issuer, serial, alg)
        for issuer in (1, 2, 32767)
        for serial in (1, 2, (1 << 159) - 1, -5)
        for alg in ("sha1", "sha256", "sha384", "sha512")
    }
    assert len(keys) == 3 * 4 * 4


def test_shared_suffix_round_trip(demo_ca: DemoCA) -> None:
    cert = demo_ca.responder_cert.public_bytes(Encoding.DER)
    suffixes = SharedSuffixes()
    suffixes.register(cert)
    head, tail = suffixes.split(b"response-head" + cert)
    assert (head, tail is next(iter(suffixes._suffixes))) == (b"response-head", True)
    assert suffixes.split(b"no certificate here") == (b"no certificate here", b"")


def test_answer_stats_reach_prometheus() -> None:
    labels = {"method": "GET", "result": "revoked", "source": "store"}
    before = REGISTRY.get_sample_value("ocsp_requests_total", labels) or 0.0
    count_before = REGISTRY.get_sample_value("ocsp_request_seconds_count") or 0.0
    sum_before = REGISTRY.get_sample_value("ocsp_request_seconds_sum") or 0.0
    le = {"le": "0.001"}
    bucket_before = REGISTRY.get_sample_value("ocsp_request_seconds_bucket", le) or 0.0
    age_le = {"le": "3600.0"}
    age_count_before = REGISTRY.get_sample_value("ocsp_response_age_seconds_count") or 0.0
    age_bucket_before = REGISTRY.get_sample_value("ocsp_response_age_seconds_bucket", age_le)
    stats = AnswerStats()
    stats.count("GET", "revoked", "store", 0.0004, 120)  # a response signed 2 min ago
    stats.count("GET", "revoked", "store", 0.02, 4 * 86400)
    assert REGISTRY.get_sample_value("ocsp_requests_total", labels) in (None, before)
    stats.flush()
    assert REGISTRY.get_sample_value("ocsp_requests_total", labels) == before + 2
    assert REGISTRY.get_sample_value("ocsp_request_seconds_count") == count_before + 2
    assert REGISTRY.get_sample_value("ocsp_request_seconds_bucket", le) == bucket_before + 1
    assert REGISTRY.get_sample_value("ocsp_request_seconds_sum") == pytest.approx(
        sum_before + 0.0204
    )
    # the served responses' age, which the "response too old" alert watches
    assert REGISTRY.get_sample_value("ocsp_response_age_seconds_count") == age_count_before + 2
    assert (
        REGISTRY.get_sample_value("ocsp_response_age_seconds_bucket", age_le)
        == (age_bucket_before or 0.0) + 1
    )


def test_health_paths_with_empty_prefix(responder: ResponderProcess) -> None:
    """/healthz is not taken for a base64 OCSP request when the prefix is empty."""
    resp = httpx.get(responder.url + "/healthz")
    assert (resp.status_code, resp.text) == (200, "ok\n")
    resp = responder.ready()
    assert (resp.status_code, resp.text) == (200, "ready\n")


def test_warm_up_loads_recent_responses(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    first = write_config(tmp_path / "a", database, [p256_issuer]).start()
    try:
        certs = [p256_issuer.ca.issue_leaf(f"warm{i}.test") for i in range(3)]
        for cert in certs:
            assert first.record(cert).status_code == 201
    finally:
        first.stop()
    second = write_config(tmp_path / "b", database, [p256_issuer]).start()
    try:
        deadline = time.monotonic() + 10
        while "warm-up: " not in second.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "warm-up: 3 responses in memory" in second.log()
        frozen = re.search(r"\((\d+) objects frozen out of the cyclic GC\)", second.log())
        assert frozen is not None and int(frozen.group(1)) > 0
        assert second.ready().status_code == 200
        der = build_request(certs[0], p256_issuer.ca.ca_cert)
        assert httpx.get(get_url(second.url, der)).status_code == 200
    finally:
        second.stop()


def test_cache_evicts_oldest_and_survives_drops(demo_ca: DemoCA) -> None:
    from responder.response_cache import ResponseCache, ServedResponse
    from signer.response_builder import CertStatus

    cache = ResponseCache(3)
    entry = ServedResponse.build(b"x", CertStatus.GOOD, 1, 2, 2)
    for serial in range(1, 4):
        cache.put(cache_key(1, serial, "sha1"), entry)
    assert cache.drop_serial(1, 2) == 1
    cache.put(cache_key(1, 4, "sha1"), entry)  # room left by the drop: nothing evicted
    assert cache.get(cache_key(1, 1, "sha1")) is entry
    cache.put(cache_key(1, 5, "sha1"), entry)  # full: the oldest (1) goes
    assert cache.get(cache_key(1, 1, "sha1")) is None
    assert len(cache) == 3
    for serial in range(6, 10_000):  # churn stays bounded
        cache.put(cache_key(1, serial, "sha1"), entry)
    assert len(cache) == 3 and len(cache._order) <= 4


def test_batched_write_back_keeps_the_store_rules(database: str, demo_ca: DemoCA) -> None:
    """One statement for a batch: newest per serial wins, revoked is never replaced by good."""
    import asyncio
    import datetime as dt

    from cryptography import x509

    from responder.store import PresignedStore
    from responder.write_back import WriteBack
    from signer.issuers import issuer_from_certificate, make_responder
    from signer.response_builder import CertStatus, Revocation, ValidityPolicy, sign_response
    from tests.support import sql

    issuer = issuer_from_certificate("w", demo_ca.ca_cert)
    issuer.responders.append(
        make_responder(issuer, demo_ca.responder_cert, demo_ca.responder_key, delegated=True)
    )
    policy = ValidityPolicy()
    now = dt.datetime.now(dt.UTC)
    older = sign_response(issuer, 7, CertStatus.GOOD, policy, now=now - dt.timedelta(minutes=5))
    newer = sign_response(issuer, 7, CertStatus.GOOD, policy, now=now)
    revocation = Revocation(now - dt.timedelta(minutes=30), x509.ReasonFlags.key_compromise)
    revoked = sign_response(
        issuer,
        8,
        CertStatus.REVOKED,
        policy,
        revocation=revocation,
        now=now - dt.timedelta(minutes=1),
    )
    good_later = sign_response(issuer, 8, CertStatus.GOOD, policy, now=now)

    async def run() -> dict[bytes, bytes]:
        store = await PresignedStore.connect(database, max_size=2)
        try:
            queue = WriteBack(store)
            queue.add(1, 7, newer)
            queue.add(1, 7, older)  # same batch, older: not the one stored
            queue.add(1, 8, revoked)
            await queue.drain()
            queue = WriteBack(store)
            queue.add(1, 8, good_later)  # never replaces a revoked response
            await queue.drain()
        finally:
            await store.close()
        rows = await sql(database, "SELECT serial, der FROM responses WHERE issuer_id = 1")
        return {bytes(r["serial"]): bytes(r["der"]) for r in rows}

    stored = asyncio.run(run())
    assert stored == {b"\x07": newer.der, b"\x08": revoked.der}


def test_warm_up_never_caches_a_response_a_revocation_replaced(
    database: str, demo_ca: DemoCA, caplog: pytest.LogCaptureFixture
) -> None:
    """The warm-up reads one snapshot in batches. A revocation committed after that
    snapshot is not in the rows; if its invalidation arrives while a batch is on its way,
    that serial must not go into the cache (the batch holds the "good" the revocation
    replaced); the rest of the batch may. A whole-cache clear stops the warm-up.

    Real PostgreSQL and a real WarmUp; the test only picks the moment the invalidation
    lands: right after the rows were read, before the warm-up puts them."""
    import asyncio
    import datetime as dt
    import logging
    from collections.abc import AsyncGenerator

    from cryptography import x509

    from responder.response_cache import ResponseCache
    from responder.store import PresignedStore, StoredResponse
    from responder.warmup import WarmUp
    from signer.issuers import issuer_from_certificate, make_responder
    from signer.response_builder import CertStatus, Revocation, ValidityPolicy, sign_response

    issuer = issuer_from_certificate("w", demo_ca.ca_cert)
    issuer.responders.append(
        make_responder(issuer, demo_ca.responder_cert, demo_ca.responder_key, delegated=True)
    )
    policy = ValidityPolicy()
    good = {serial: sign_response(issuer, serial, CertStatus.GOOD, policy) for serial in (1, 2)}
    revocation = Revocation(dt.datetime.now(dt.UTC), x509.ReasonFlags.key_compromise)
    revoked = sign_response(issuer, 2, CertStatus.REVOKED, policy, revocation=revocation)

    class RevokedMidway:
        """The real store; serial 2 is revoked (stored, then invalidated) right after
        the warm-up's snapshot was read."""

        def __init__(self, store: PresignedStore, cache: ResponseCache, clear: bool) -> None:
            self.store, self.cache, self.clear = store, cache, clear

        async def recent_responses(
            self, limit: int
        ) -> AsyncGenerator[list[tuple[int, int, StoredResponse]], None]:
            async for batch in self.store.recent_responses(limit):
                if self.clear:  # the listener reconnected: it clears the whole cache
                    self.cache.clear()
                else:
                    await self.store.store_responses([(1, 2, revoked)])
                    self.cache.drop_serial(1, 2)  # what the listener does on a NOTIFY
                yield batch

    async def run(invalidate: bool, clear: bool = False) -> ResponseCache:
        store = await PresignedStore.connect(database, max_size=2)
        try:
            await store.pool.execute("DELETE FROM responses")
            await store.store_responses([(1, s, r) for s, r in good.items()])
            cache = ResponseCache(100)
            source = RevokedMidway(store, cache, clear) if invalidate else store
            warm = WarmUp(source, cache, 100, policy)  # type: ignore[arg-type]
            warm.start()
            await asyncio.wait_for(warm.done.wait(), 10)
            return cache
        finally:
            await store.close()

    # without an invalidation both load
    plain = asyncio.run(run(False))
    assert plain.get(cache_key(1, 2, "sha1")) is not None and len(plain) == 2
    cache = asyncio.run(run(True))
    entry = cache.get(cache_key(1, 2, "sha1"))
    assert entry is None or entry.der != good[2].der, "the replaced 'good' was cached"
    # only the invalidated serial is left to the store: the rest of the batch loads
    kept = cache.get(cache_key(1, 1, "sha1"))
    assert kept is not None and kept.der == good[1].der and len(cache) == 1
    # a whole-cache clear (the listener reconnected: anything may have been missed)
    # stops the warm-up
    with caplog.at_level(logging.INFO, logger="responder.warmup"):
        stopped = asyncio.run(run(True, clear=True))
    assert len(stopped) == 0
    assert any("warm-up stopped after 0 responses" in r.getMessage() for r in caplog.records)
