"""The batched store lookup (responder/store_lookup.py) against a real PostgreSQL.

It must give, key by key, exactly what ``fetch_response`` + ``knowledge`` give one by one,
in far fewer statements; fail every waiter of a failed statement and recover; survive
cancelled waiters; keep the read-replica rules; and plan as primary-key probes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections.abc import Iterator

import asyncpg
import pytest
from prometheus_client import REGISTRY

from responder.protocol import CertIdRequest
from responder.replicas import UNRESOLVED, Replica, ReplicaSet
from responder.response_cache import ResponseCache
from responder.sources import SerialNotFound, build_chain
from responder.store import Knowledge, PresignedStore, StoredResponse, serial_key
from responder.store_lookup import LOOKUP_STATEMENTS, BatchedLookup, Lookup
from signer.demo_ca import DemoCA
from signer.issuers import Issuer, IssuerRegistry, issuer_from_certificate, make_responder
from signer.response_builder import CertStatus, ValidityPolicy, sign_response
from tests.support import create_database, sql

#: what a serial is in the store, by the rows it has
KINDS = (
    "good",  # certificate + response
    "revoked",  # certificate + revoked response + revocation
    "recorded",  # certificate, response lost
    "ct_only",  # CT index only: a coverage gap
    "ct_repaired",  # CT index + response
    "revoked_unrecorded",  # revocation only: not_after = revoked_at + 398 days
    "revoked_no_response",  # certificate + revocation
    "response_only",  # a response row and nothing else
    "unknown",
)


def serial_for(kind: int, n: int, *, wide: bool = False) -> int:
    """Distinct serials per kind; ``wide``: 20 bytes with the top bit set (a leading 0)."""
    base = (kind << 16) | n
    return (1 << 159) | base if wide else base + 1


async def put(
    conn: asyncpg.Connection, issuer_id: int, serial: int, kind: str, *, tag: bytes = b"primary"
) -> None:
    """The rows a serial of ``kind`` has (``tag`` marks the response bytes)."""
    key = serial_key(serial)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if kind in ("good", "revoked", "recorded", "revoked_no_response"):
        await conn.execute(
            "INSERT INTO certificates (issuer_id, serial, not_after, kinds) VALUES ($1, $2, $3, 2)",
            issuer_id,
            key,
            now + dt.timedelta(days=90, seconds=serial % 1000),
        )
    if kind in ("good", "revoked", "ct_repaired", "response_only"):
        await conn.execute(
            "INSERT INTO responses (issuer_id, serial, status, this_update, next_update, der) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            issuer_id,
            key,
            1 if kind == "revoked" else 0,
            now - dt.timedelta(hours=1),
            now + dt.timedelta(days=3),
            tag + key,
        )
    if kind in ("ct_only", "ct_repaired"):
        await conn.execute(
            "INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, logged_at) "
            "VALUES ($1, $2, 1, $3, 1, $4)",
            issuer_id,
            key,
            serial % 100_000,
            now,
        )
    if kind in ("revoked", "revoked_unrecorded", "revoked_no_response"):
        await conn.execute(
            "INSERT INTO revocations (issuer_id, serial, revoked_at, reason) "
            "VALUES ($1, $2, $3, 1)",
            issuer_id,
            key,
            now - dt.timedelta(days=2, seconds=serial % 1000),
        )


async def add_issuers(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO issuers (id, spki_sha256, name, subject) VALUES "
        "(1, sha256('one'), 'one', 'CN=one'), (2, sha256('two'), 'two', 'CN=two')"
    )


@pytest.fixture(scope="module")
def populated(module_database: str) -> Iterator[tuple[str, list[tuple[int, int]]]]:
    """Two issuers, every kind, six serials each (two of them 20 bytes wide); in issuer 2
    the kinds are rotated, so one serial number means different things per issuer."""

    async def fill() -> list[tuple[int, int]]:
        conn = await asyncpg.connect(module_database)
        keys = []
        try:
            await add_issuers(conn)
            for issuer_id in (1, 2):
                for index in range(len(KINDS)):
                    kind = KINDS[(index + 3 * (issuer_id - 1)) % len(KINDS)]
                    for n in range(6):
                        serial = serial_for(index, n, wide=n >= 4)
                        await put(conn, issuer_id, serial, kind)
                        keys.append((issuer_id, serial))
        finally:
            await conn.close()
        return keys

    yield module_database, asyncio.run(fill())


async def one_by_one(store: PresignedStore, issuer_id: int, serial: int) -> Lookup:
    return Lookup(
        await store.fetch_response(issuer_id, serial), await store.knowledge(issuer_id, serial)
    )


def test_concurrent_gets_match_single_reads_in_one_statement(
    populated: tuple[str, list[tuple[int, int]]],
) -> None:
    dsn, keys = populated
    requests = keys * 2  # every key twice in the same batch
    random.Random(7).shuffle(requests)
    assert len(requests) >= 200

    async def run() -> None:
        store = await PresignedStore.connect(dsn, max_size=4)
        try:
            lookup = BatchedLookup(store)
            got = await asyncio.gather(*(lookup.get(i, s) for i, s in requests))
            # everything asked in one loop iteration: one batch, duplicates asked once
            assert (lookup.batches, lookup.statements, lookup.keys) == (1, 1, len(keys))
            seen_kinds = set()
            for (issuer_id, serial), answer in zip(requests, got, strict=True):
                assert answer == await one_by_one(store, issuer_id, serial), (issuer_id, serial)
                k = answer.knowledge
                seen_kinds.add((k.known, k.ct_only, k.has_response, k.revocation is not None))
            # every distinct shape of answer really occurred
            assert len(seen_kinds) == 8
        finally:
            await store.close()

    asyncio.run(run())


def test_revocation_without_certificate_row_gets_the_lifetime_bound(
    populated: tuple[str, list[tuple[int, int]]],
) -> None:
    dsn, _ = populated
    serial = serial_for(KINDS.index("revoked_unrecorded"), 0)

    async def run() -> Knowledge:
        store = await PresignedStore.connect(dsn, max_size=2)
        try:
            return (await BatchedLookup(store).get(1, serial)).knowledge
        finally:
            await store.close()

    knowledge = asyncio.run(run())
    assert knowledge.known and knowledge.revocation is not None and knowledge.not_after
    assert knowledge.not_after - knowledge.revocation.revoked_at == dt.timedelta(days=398)


def test_many_distinct_keys_are_cut_into_bounded_batches(
    populated: tuple[str, list[tuple[int, int]]],
) -> None:
    dsn, keys = populated
    unknown = [(1, serial_for(99, n)) for n in range(600 - len(keys))]
    requests = keys + unknown

    async def run() -> None:
        store = await PresignedStore.connect(dsn, max_size=4)
        try:
            lookup = BatchedLookup(store)
            counted = REGISTRY.get_sample_value("ocsp_store_lookup_batch_keys_count") or 0.0
            got = await asyncio.gather(*(lookup.get(i, s) for i, s in requests))
            assert (lookup.batches, lookup.statements, lookup.keys) == (3, 3, 600)  # 256+256+88
            assert REGISTRY.get_sample_value("ocsp_store_lookup_batch_keys_count") == counted + 3
            for (issuer_id, serial), answer in zip(requests, got, strict=True):
                assert answer == await one_by_one(store, issuer_id, serial)
            # a lone request is its own batch on the next loop iteration: no timer
            alone = await lookup.get(*keys[0])
            assert alone == got[0] and lookup.batches == 4
        finally:
            await store.close()

    asyncio.run(run())


async def blocked_on(locker: asyncpg.Connection) -> int:
    """Wait until another backend waits for a lock (ours): that backend's pid."""
    for _ in range(200):
        pid = await locker.fetchval(
            "SELECT a.pid FROM pg_stat_activity a WHERE a.datname = current_database() "
            "AND a.wait_event_type = 'Lock' AND a.pid <> pg_backend_pid()"
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError("no lookup waited for the lock")


def test_keys_gather_while_batches_are_in_flight(database: str) -> None:
    """While ``max_in_flight`` batches run, keys asked in later loop iterations wait and
    go together in the next batch, sent when one finishes: under load batches grow."""

    async def run() -> None:
        conn = await asyncpg.connect(database)
        await add_issuers(conn)
        await put(conn, 1, 5, "good")
        store = await PresignedStore.connect(database, min_size=1, max_size=2)
        lookup = BatchedLookup(store, max_in_flight=1)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE")
                first = asyncio.create_task(lookup.get(1, 5))
                await blocked_on(conn)
                later = []
                for serial in range(100, 150):  # fifty loop iterations apart
                    later.append(asyncio.create_task(lookup.get(1, serial)))
                    await asyncio.sleep(0)
                assert (lookup.batches, lookup.statements) == (1, 1)
            assert (await first).response is not None
            assert not any(a.knowledge.known for a in await asyncio.gather(*later))
            assert (lookup.batches, lookup.statements, lookup.keys) == (2, 2, 51)
        finally:
            await store.close()
            await conn.close()

    asyncio.run(run())


def test_waiting_keys_beyond_the_queue_limit_are_refused_at_once(
    database: str, issuer: Issuer
) -> None:
    """While the database is behind (the batch in flight blocked), at most
    ``store_lookup_queue_limit`` distinct serials wait: the next one is Overloaded
    (tryLater) at once, counted; a serial already waiting still joins; when the database
    answers again every waiter gets its answer and new keys are taken again."""
    from responder.sources import Overloaded

    async def run() -> None:
        store = await PresignedStore.connect(database, min_size=1, max_size=2)
        await store.register_issuers([issuer])
        conn = await asyncpg.connect(database)
        for serial in range(1, 8):
            await put(conn, issuer.db_id, serial, "good")
        chain, live = build_chain(
            IssuerRegistry([issuer]),
            ResponseCache(0),
            store,
            ValidityPolicy(),
            signing_concurrency=1,
            signing_queue_limit=256,
            store_lookup_queue_limit=2,
        )
        lookup = chain.next.next.lookup  # type: ignore[attr-defined]
        lookup.max_in_flight = 1
        name_hash, key_hash = issuer.cert_id_hashes["sha1"]

        def ask(serial: int) -> asyncio.Task[object]:
            req = CertIdRequest("sha1", name_hash, key_hash, serial, None)
            return asyncio.create_task(chain.response(req))

        refused_before = REGISTRY.get_sample_value("ocsp_store_lookups_refused_total") or 0
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE")
                first = ask(1)
                await blocked_on(conn)
                waiting = [ask(2), ask(3)]
                await asyncio.sleep(0.05)
                assert lookup.waiting == 2
                with pytest.raises(Overloaded):  # at once: TimeoutError if it waited
                    await asyncio.wait_for(ask(4), 2)
                twin = ask(2)  # the same serial as a waiting one: no new key, not refused
                await asyncio.sleep(0.05)
                assert not twin.done() and lookup.waiting == 2
                refused = REGISTRY.get_sample_value("ocsp_store_lookups_refused_total")
                assert refused == refused_before + 1
            answers = await asyncio.gather(first, *waiting, twin)
            assert [a.source for a in answers] == ["store"] * 4  # type: ignore[attr-defined]
            assert lookup.waiting == 0
            assert (await ask(4)).source == "store"  # type: ignore[attr-defined]
        finally:
            await live.drain()
            await store.close()
            await conn.close()

    asyncio.run(run())


def test_failed_statement_fails_every_waiter_then_the_next_batch_works(database: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(database)
        await add_issuers(conn)
        await put(conn, 1, 5, "good")
        store = await PresignedStore.connect(database, min_size=1, max_size=1)
        lookup = BatchedLookup(store)
        try:
            await lookup.get(1, 5)  # the statement is prepared on the pool's connection
            async with conn.transaction():
                await conn.execute("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE")
                waiters = [asyncio.create_task(lookup.get(1, s)) for s in range(1, 41)]
                # the backend running the batch is terminated mid-statement
                await conn.execute("SELECT pg_terminate_backend($1)", await blocked_on(conn))
                results = await asyncio.gather(*waiters, return_exceptions=True)
            assert all(isinstance(r, Exception) for r in results), results
            assert len({type(r) for r in results}) == 1
            assert lookup.batches == 2
            # the pool reconnects: the next batch answers
            again = await asyncio.gather(lookup.get(1, 5), lookup.get(1, 6))
            assert again[0].response is not None and again[0].knowledge.known
            assert again[1] == Lookup(None, Knowledge(known=False, revocation=None))
        finally:
            await store.close()
            await conn.close()

    asyncio.run(run())


def test_cancelled_waiters_do_not_break_the_batch(database: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(database)
        await add_issuers(conn)
        await put(conn, 1, 5, "good")
        await put(conn, 1, 6, "recorded")
        store = await PresignedStore.connect(database, min_size=1, max_size=2)
        lookup = BatchedLookup(store)
        try:
            # cancelled while the statement runs
            async with conn.transaction():
                await conn.execute("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE")
                first, twin, other = (asyncio.create_task(lookup.get(1, s)) for s in (5, 5, 6))
                await blocked_on(conn)
                first.cancel()
            assert (await twin).response is not None
            assert (await other).knowledge.known and (await other).response is None
            with pytest.raises(asyncio.CancelledError):
                await first
            # cancelled before the batch is sent: the others are still answered
            a, b = asyncio.create_task(lookup.get(1, 5)), asyncio.create_task(lookup.get(1, 6))
            await asyncio.sleep(0)  # both have queued their key; the flush has not run
            a.cancel()
            assert (await b).knowledge.known
            # a key whose only waiter is gone is not asked at all
            keys_before = lookup.keys
            gone = asyncio.create_task(lookup.get(1, 7))
            await asyncio.sleep(0)
            gone.cancel()
            await asyncio.sleep(0.05)
            assert lookup.keys == keys_before
        finally:
            await store.close()
            await conn.close()

    asyncio.run(run())


def test_replica_answers_only_what_the_single_reads_took_from_it(pg_admin_dsn: str) -> None:
    """A second database stands for a lagging replica: it holds some rows, with response
    bytes tagged "replica", so every answer shows where it came from."""
    primary_dsn, replica_dsn = create_database(pg_admin_dsn), create_database(pg_admin_dsn)
    # serial -> (rows on the primary, rows on the replica)
    layout = {
        1: ("good", "good"),  # final on the replica
        2: ("good", None),  # replica has not replayed it: primary
        3: ("good", "recorded"),  # replica knows it but lacks the row: primary (SHA-1)
        4: ("good", "response_only"),  # replica has a row but no record: primary
        5: ("good", "good"),  # pinned after a revocation: primary, replica not asked
        6: (None, None),  # unknown everywhere: "nothing" is asked of the primary
        7: ("ct_only", "ct_only"),  # known, no row anywhere: primary for the row
    }

    async def run() -> None:
        for dsn, side in ((primary_dsn, 0), (replica_dsn, 1)):
            conn = await asyncpg.connect(dsn)
            await add_issuers(conn)
            for serial, kinds in layout.items():
                if kinds[side] is not None:
                    tag = b"replica" if side else b"primary"
                    await put(conn, 1, serial, kinds[side], tag=tag)
            await conn.close()
        store = await PresignedStore.connect(primary_dsn, max_size=2)
        replica_pool = await asyncpg.create_pool(replica_dsn, min_size=1, max_size=2)
        store.replicas = ReplicaSet(
            replicas=[Replica("replica0", replica_pool, healthy=True, replay_lsn=1)],
            primary=store.pool,
        )
        store.replicas.pins[(1, serial_key(5))] = UNRESOLVED
        try:
            lookup = BatchedLookup(store)
            got = dict(
                zip(layout, await asyncio.gather(*(lookup.get(1, s) for s in layout)), strict=True)
            )
            origin = {s: a.response.der[:7] if a.response else None for s, a in got.items()}
            assert origin == {
                1: b"replica",
                2: b"primary",
                3: b"primary",
                4: b"primary",
                5: b"primary",
                6: None,
                7: None,
            }
            assert not got[6].knowledge.known and got[7].knowledge.ct_only
            # one batch: replica, its misses from the primary, the pinned key from the primary
            assert (lookup.batches, lookup.statements) == (1, 3)
            # without the row (a SHA-256 CertID) the replica's knowledge stands, as
            # ``knowledge`` alone took it
            knowledge_only = await lookup.get(1, 3, want_response=False)
            assert knowledge_only.knowledge.known and knowledge_only.response is None
            assert lookup.statements == 4
            # a replica that fails is not an error: the primary answers
            await replica_pool.close()
            failed_over = await asyncio.gather(*(lookup.get(1, s) for s in (1, 2)))
            assert [a.response.der[:7] for a in failed_over if a.response] == [b"primary"] * 2
        finally:
            await store.close()

    asyncio.run(run())


def plan_nodes(plan: dict[str, object]) -> Iterator[dict[str, object]]:
    yield plan
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        yield from plan_nodes(child)


@pytest.mark.parametrize("ct_not_after", [False, True], ids=["before-0005", "with-0005"])
def test_plan_is_primary_key_probes_for_batches_up_to_256(
    database: str, ct_not_after: bool
) -> None:
    """With tables big enough to tempt the planner into hash joins, every batch size (and
    the generic plan the prepared statement settles on) is index probes in nested loops;
    for both forms of the statement (with and without ct_index.not_after)."""
    statement = LOOKUP_STATEMENTS[ct_not_after]
    rows = 20_000
    pkeys = {"responses_pkey", "certificates_pkey", "revocations_pkey", "ct_index_pkey"}

    async def run() -> list[list[dict[str, object]]]:
        conn = await asyncpg.connect(database)
        try:
            await add_issuers(conn)
            await conn.execute(
                f"""
                INSERT INTO certificates (issuer_id, serial, not_after, kinds)
                  SELECT 1 + g % 2, int8send(g), now() + interval '90 days', 2
                  FROM generate_series(1, {rows}) g;
                INSERT INTO responses (issuer_id, serial, status, this_update, next_update, der)
                  SELECT 1 + g % 2, int8send(g), 0, now(), now() + interval '4 days',
                         convert_to(repeat('x', 760), 'UTF8') FROM generate_series(1, {rows}) g;
                INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, logged_at)
                  SELECT 1 + g % 2, int8send(g), 1, g, 1, now() FROM generate_series(1, {rows}) g;
                INSERT INTO revocations (issuer_id, serial, revoked_at, reason)
                  SELECT 1 + g % 2, int8send(g), now(), 1 FROM generate_series(1, {rows}, 10) g;
                ANALYZE;
                """
            )
            plans = []
            for size in (1, 16, 256):
                ids = [1 + n % 2 for n in range(size)]
                keys = [(n * 7 + 1).to_bytes(8, "big") for n in range(size)]
                text = await conn.fetchval("EXPLAIN (FORMAT JSON) " + statement, ids, keys)
                plans.append(list(plan_nodes(json.loads(text)[0]["Plan"])))
            await conn.execute(
                "PREPARE lookup(smallint[], bytea[]) AS "
                + statement.replace("::smallint[]", "").replace("::bytea[]", "")
            )
            # as the pool's prepared statement runs: after five custom plans PostgreSQL
            # settles on the generic one instead of planning every execution again
            for n in range(8):
                await conn.execute(f"EXECUTE lookup('{{1}}', ARRAY['\\x{n + 1:02x}'::bytea])")
            generic, custom = await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE name = 'lookup'"
            )
            assert (generic, custom) == (3, 5)
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            text = await conn.fetchval(
                "EXPLAIN (FORMAT JSON) EXECUTE lookup('{1,2}', ARRAY['\\x01'::bytea, '\\x02'])"
            )
            plans.append(list(plan_nodes(json.loads(text)[0]["Plan"])))
            return plans
        finally:
            await conn.close()

    for nodes in asyncio.run(run()):
        types = {str(n["Node Type"]) for n in nodes}
        assert "Seq Scan" not in types and "Hash Join" not in types, nodes
        assert {n.get("Index Name") for n in nodes} >= pkeys
        assert nodes[0]["Node Type"] == "Nested Loop"


@pytest.fixture
def issuer(database: str, demo_ca: DemoCA) -> Issuer:
    found = issuer_from_certificate("p256", demo_ca.ca_cert)
    found.responders.append(
        make_responder(found, demo_ca.responder_cert, demo_ca.responder_key, delegated=True)
    )
    return found


def test_chain_reads_once_per_request(database: str, issuer: Issuer) -> None:
    """Through the real chain: store hits, on-demand (SHA-1 and SHA-256), CT-only and
    unknown serials concurrently; the request path never calls the single-row reads."""

    class CountingStore(PresignedStore):
        single_reads = 0

        async def fetch_response(self, issuer_id: int, serial: int) -> StoredResponse | None:
            CountingStore.single_reads += 1
            return await super().fetch_response(issuer_id, serial)

        async def knowledge(self, issuer_id: int, serial: int) -> Knowledge:
            CountingStore.single_reads += 1
            return await super().knowledge(issuer_id, serial)

    policy = ValidityPolicy()

    def request(serial: int, alg: str = "sha1") -> CertIdRequest:
        name_hash, key_hash = issuer.cert_id_hashes[alg]
        return CertIdRequest(alg, name_hash, key_hash, serial, None)

    async def run() -> None:
        pool = (await PresignedStore.connect(database, max_size=4)).pool
        store = CountingStore(pool)
        await store.register_issuers([issuer])
        conn = await asyncpg.connect(database)
        for serial in range(1, 21):
            await put(conn, issuer.db_id, serial, "recorded")
        for serial in range(21, 31):
            await put(conn, issuer.db_id, serial, "ct_only")
        await conn.close()
        signed = [
            (issuer.db_id, s, sign_response(issuer, s, CertStatus.GOOD, policy))
            for s in range(31, 41)
        ]
        await store.store_responses(signed)
        chain, live = build_chain(
            IssuerRegistry([issuer]),
            ResponseCache(0),
            store,
            policy,
            signing_concurrency=4,
            signing_queue_limit=256,
        )
        lookup = chain.next.next.lookup  # type: ignore[attr-defined]
        try:
            queries = [request(s) for s in range(1, 41)]
            queries += [request(s, "sha256") for s in range(1, 11)]
            queries += [request(s) for s in range(1000, 1010)]  # unknown
            queries += [request(s, "sha256") for s in range(1000, 1010)]  # unknown
            answers = await asyncio.gather(
                *(chain.response(q) for q in queries), return_exceptions=True
            )
            by_source: dict[str, int] = {}
            for query, answer in zip(queries, answers, strict=True):
                if query.serial >= 1000:
                    assert isinstance(answer, SerialNotFound), answer
                    continue
                assert not isinstance(answer, BaseException), answer
                by_source[answer.source] = by_source.get(answer.source, 0) + 1
                assert answer.response.status is CertStatus.GOOD
            assert by_source == {"live": 40, "store": 10}
            assert CountingStore.single_reads == 0
            # 70 requests: SHA-1 ones in StoreSource and SHA-256 ones in the live source
            # asked in the same loop iteration: one statement
            assert lookup.statements == 1
            # the CT-only serials were repaired: their responses are stored
            rows = await sql(
                database,
                "SELECT count(*) AS n FROM responses WHERE issuer_id = $1 AND serial = ANY($2)",
                issuer.db_id,
                [serial_key(s) for s in range(21, 31)],
            )
            assert rows[0]["n"] == 10
        finally:
            await live.drain()
            await store.close()

    asyncio.run(run())


def test_live_signer_alone_still_reads_knowledge(database: str, issuer: Issuer) -> None:
    """Without a StoreSource (no lookup given), the live source reads ``knowledge``."""
    from responder.sources import LiveSigningSource, Query

    async def run() -> None:
        store = await PresignedStore.connect(database, max_size=2)
        await store.register_issuers([issuer])
        conn = await asyncpg.connect(database)
        await put(conn, issuer.db_id, 9, "revoked_no_response")
        await conn.close()
        live = LiveSigningSource(store, ValidityPolicy())
        try:
            name_hash, key_hash = issuer.cert_id_hashes["sha1"]
            answer = await live.response(
                Query(CertIdRequest("sha1", name_hash, key_hash, 9, None), issuer)
            )
            assert answer.response.status is CertStatus.REVOKED
            with pytest.raises(SerialNotFound):
                await live.response(
                    Query(CertIdRequest("sha1", name_hash, key_hash, 10, None), issuer)
                )
        finally:
            await live.drain()
            await store.close()

    asyncio.run(run())


def test_queue_limit_counts_sha1_requests_readied_by_one_batch(
    database: str, issuer: Issuer
) -> None:
    """SHA-1 on-demand requests reach the live source with their knowledge (no read in its
    queue): those readied together by one lookup batch still fill its queue, beyond which
    they are Overloaded (tryLater); a failed lookup is Unavailable (tryLater)."""
    from responder.sources import Overloaded, Unavailable

    async def run() -> None:
        store = await PresignedStore.connect(database, max_size=2)
        await store.register_issuers([issuer])
        conn = await asyncpg.connect(database)
        for serial in range(1, 41):
            await put(conn, issuer.db_id, serial, "recorded")
        await conn.close()
        chain, live = build_chain(
            IssuerRegistry([issuer]),
            ResponseCache(0),
            store,
            ValidityPolicy(),
            signing_concurrency=1,
            signing_queue_limit=1,
        )
        name_hash, key_hash = issuer.cert_id_hashes["sha1"]
        queries = [CertIdRequest("sha1", name_hash, key_hash, s, None) for s in range(1, 41)]
        try:
            answers = await asyncio.gather(
                *(chain.response(q) for q in queries), return_exceptions=True
            )
            overloaded = [a for a in answers if isinstance(a, Overloaded)]
            signed = [a for a in answers if not isinstance(a, BaseException)]
            assert (len(signed), len(overloaded)) == (1, 39), answers
            await store.pool.close()
            with pytest.raises(Unavailable):
                await chain.response(queries[0])
        finally:
            await live.drain()
            await store.close()

    asyncio.run(run())
