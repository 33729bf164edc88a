"""The PostgreSQL store: certificate records, pre-signed responses, revocations.

Writes that a CA relies on (recording a certificate, a revocation) commit with
``synchronous_commit = on`` whatever the server default, and are retried on transient
errors with bounded backoff; when a write still fails the caller gets ``StoreUnavailable``
and must tell its client so. Nothing here acknowledges an uncommitted write.

A connection lost *during* COMMIT is ambiguous: the transaction may or may not have
committed. The retry is safe because every write is idempotent (``ON CONFLICT``); the
price is that a retried recording whose first COMMIT did land reports "already recorded"
(``created`` False) instead of "new". Both mean "durably recorded" (docs/recording.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from responder.replicas import ReplicaSet
from responder.schema import (
    certificates_has_tbs_sha256,
    ct_index_has_not_after,
    responses_has_this_update_index,
)
from signer.issuers import Issuer
from signer.response_builder import (
    REASON_CODES,
    REASONS_BY_CODE,
    CertStatus,
    Revocation,
    SignedResponse,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the longest BR subscriber certificate lifetime: the notAfter bound of a serial that was
#: revoked without ever being recorded (for the retention rule)
MAX_CERTIFICATE_LIFETIME = dt.timedelta(days=398)

KIND_PRECERTIFICATE = 1
KIND_CERTIFICATE = 2

#: Errors after which the same write may succeed if tried again.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    # a migration changed a table under a statement prepared before it (the incident's
    # ALTER TABLE race): asyncpg re-prepares, but only outside a transaction
    asyncpg.exceptions.InvalidCachedStatementError,
    asyncpg.exceptions.PostgresConnectionError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,  # includes a pool acquire that timed out: all connections busy
)

#: Seconds to wait for a pool connection before counting the attempt as failed (transient).
ACQUIRE_TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def durable_transaction(
    pool: asyncpg.Pool, *, timeout: float | None = ACQUIRE_TIMEOUT
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection inside a transaction that commits with ``synchronous_commit =
    on`` whatever the server, database or role default: what the CA, or the coverage-gap
    record, is told was written survives a crash of the server."""
    async with pool.acquire(timeout=timeout) as conn, conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = on")
        yield conn


#: PostgreSQL NOTIFY channel on which revocations tell every responder to drop a serial.
INVALIDATION_CHANNEL = "ocsp_invalidations"


def invalidation_payload(issuer_id: int, serial: int) -> str:
    """``<issuer id>:<serial hex>``: small, well under NOTIFY's 8000-byte payload limit."""
    return f"{issuer_id}:{serial:x}"


def parse_invalidation_payload(payload: str) -> tuple[int, int]:
    issuer, _, serial = payload.partition(":")
    return int(issuer), int(serial, 16)


class StoreUnavailable(Exception):
    """The database could not be reached or kept failing; nothing was acknowledged.

    ``reason`` is a metrics label: timeout, conflict, connection or database_error."""

    def __init__(self, message: str, *, reason: str = "connection") -> None:
        super().__init__(message)
        self.reason = reason


def serial_key(serial: int) -> bytes:
    """The DER INTEGER content of a serial: the one spelling used as a key everywhere."""
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True)


def serial_from_key(key: bytes) -> int:
    return int.from_bytes(key, "big", signed=True)


def to_datetime(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


#: one column array each of a batch of ``responses`` rows, for ``unnest()``
ResponseArrays = tuple[
    list[int], list[dt.datetime], list[dt.datetime], list[bytes], list[int | None]
]


def response_arrays(responses: Sequence[SignedResponse]) -> ResponseArrays:
    """The (status, this_update, next_update, der, signer) column arrays of signed
    responses, in the order every batched write of ``responses`` takes them."""
    return (
        [int(s.status) for s in responses],
        [to_datetime(s.this_update) for s in responses],
        [to_datetime(s.next_update) for s in responses],
        [s.der for s in responses],
        [s.signer or None for s in responses],
    )


@dataclass(frozen=True, slots=True)
class StoredResponse:
    der: bytes
    status: CertStatus
    this_update: int
    next_update: int


@dataclass(frozen=True, slots=True)
class Knowledge:
    """What the store knows about a serial: whether it was issued, and if revoked."""

    known: bool
    revocation: Revocation | None
    #: seen in CT but never recorded by the CA (its write was lost or bypassed)
    ct_only: bool = False
    #: a signed response row exists (fresh or not)
    has_response: bool = False
    #: for the retention rule: the recorded notAfter, else (revoked without a record)
    #: revocation time + 398 days, the longest BR lifetime; None when neither is known
    not_after: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class RevocationContext:
    """What deciding a revocation request needs: whether the serial was issued (recorded
    or seen in CT) and the stored revocation, if any."""

    known: bool
    revocation: Revocation | None


@dataclass(frozen=True, slots=True)
class StoredState:
    """The status and window of the response stored for a serial: what OCSP serves."""

    status: CertStatus
    this_update: int
    next_update: int


def stored_state_from_row(row: asyncpg.Record) -> StoredState:
    return StoredState(
        status=CertStatus(row["status"]),
        this_update=int(row["this_update"].timestamp()),
        next_update=int(row["next_update"].timestamp()),
    )


@dataclass(frozen=True, slots=True)
class Recorded:
    """One certificate's recording: new or already recorded, and the stored response."""

    created: bool
    stored: StoredState


def stored_response_from_row(row: asyncpg.Record) -> StoredResponse:
    """A ``responses`` row (der, status, this_update, next_update) as a StoredResponse."""
    return StoredResponse(
        der=row["der"],
        status=CertStatus(row["status"]),
        this_update=int(row["this_update"].timestamp()),
        next_update=int(row["next_update"].timestamp()),
    )


def knowledge_from_row(row: asyncpg.Record, *, has_response: bool) -> Knowledge:
    """Knowledge from a row of (recorded, in_ct, not_after, revoked_at, reason): one rule
    for every reader (``PresignedStore.knowledge``, responder/store_lookup.py)."""
    revocation = None
    if row["revoked_at"] is not None:
        revocation = Revocation(row["revoked_at"], REASONS_BY_CODE[row["reason"]])
    return Knowledge(
        known=bool(row["recorded"] or row["in_ct"]) or revocation is not None,
        revocation=revocation,
        ct_only=bool(row["in_ct"]) and not row["recorded"],
        has_response=has_response,
        not_after=row["not_after"]
        or (revocation.revoked_at + MAX_CERTIFICATE_LIFETIME if revocation else None),
    )


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    issuer_id: int
    serial: int
    not_after: dt.datetime
    precertificate: bool
    #: SHA-256 of the TBSCertificate without the CT extensions (signer/recording.py
    #: ``tbs_fingerprint``): one per certificate, shared by a precertificate and its
    #: final certificate only. None: not checked for serial collisions.
    tbs_sha256: bytes | None = None


@dataclass(frozen=True, slots=True)
class Collision:
    """A record whose serial is held by another certificate of the same issuer."""

    index: int  # position in the records given to ``record_certificates``
    issuer_id: int
    serial: int
    held: bytes  # the fingerprint already recorded (or earlier in the same call)
    submitted: bytes


class SerialCollision(Exception):
    """Recording refused, nothing of the call written: a serial is already recorded (or
    given earlier in the same call) for a different certificate. A CA bug (serials are
    unique per issuer: BR 7.1, RFC 5280 4.1.2.2), never retried."""

    def __init__(self, collisions: Sequence[Collision]) -> None:
        super().__init__(f"{len(collisions)} serial collision(s)")
        self.collisions = list(collisions)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded backoff: 0.05 s doubling to 2 s (jittered), at most ``attempts`` tries and
    none started after ``deadline``: a caller hears 503 within ~15 s, 25 s if the last
    statement hangs until the command timeout (the CA's own timeout should be longer)."""

    attempts: int = 8
    first_delay: float = 0.05
    max_delay: float = 2.0
    #: no new attempt starts after this many seconds (a statement can take up to the
    #: pool's command_timeout of 10 s on its own)
    deadline: float = 15.0


async def with_retries(
    operation: Callable[[], Awaitable[T]], what: str, policy: RetryPolicy = RetryPolicy()
) -> T:
    """Run ``operation`` (one whole idempotent transaction) again after transient failures.

    Raises ``StoreUnavailable`` (with ``reason``) when the retries are exhausted or the
    database refuses the write for a reason retrying cannot fix."""
    delay = policy.first_delay
    give_up_at = time.monotonic() + policy.deadline
    for attempt in range(1, policy.attempts + 1):
        try:
            return await operation()
        except TRANSIENT_ERRORS as exc:
            if attempt == policy.attempts or time.monotonic() + delay > give_up_at:
                raise StoreUnavailable(
                    f"{what}: database unavailable after {attempt} attempts: "
                    f"{type(exc).__name__}: {exc}",
                    reason=failure_reason(exc),
                ) from exc
            log.warning("%s: transient %s, retrying (%d)", what, type(exc).__name__, attempt)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, policy.max_delay)
        except asyncpg.PostgresError as exc:
            raise StoreUnavailable(
                f"{what}: database refused the write: {type(exc).__name__}: {exc}",
                reason="database_error",
            ) from exc
    raise AssertionError("unreachable")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset: nothing to do. asyncpg's default runs RESET ALL/UNLISTEN/... on every
    release, a second round trip for each one-row read on the hot path. Nothing here
    changes session state (only SET LOCAL inside transactions); open transactions and
    listener callbacks are still cleared by asyncpg itself."""


async def _put_revoked_response(
    conn: asyncpg.Connection, issuer_id: int, serial: int, signed: SignedResponse
) -> None:
    """Store a revocation's re-signed response over whatever row is there (only the
    revocation paths do this, in the transaction that writes the revocation)."""
    await conn.execute(
        "INSERT INTO responses (issuer_id, serial, status, this_update, "
        "next_update, der, signer) VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "ON CONFLICT (issuer_id, serial) DO UPDATE SET status = EXCLUDED.status, "
        "  this_update = EXCLUDED.this_update, "
        "  next_update = EXCLUDED.next_update, der = EXCLUDED.der, "
        "  signer = EXCLUDED.signer",
        issuer_id,
        serial_key(serial),
        int(signed.status),
        to_datetime(signed.this_update),
        to_datetime(signed.next_update),
        signed.der,
        signed.signer or None,
    )


async def _notify_invalidation(conn: asyncpg.Connection, issuer_id: int, serial: int) -> None:
    """Delivered to every responder's listener at commit (responder/invalidation.py)."""
    await conn.execute(
        "SELECT pg_notify($1, $2)", INVALIDATION_CHANNEL, invalidation_payload(issuer_id, serial)
    )


def failure_reason(exc: BaseException) -> str:
    """A small closed set of labels for recording_failures_total{reason}."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(
        exc,
        asyncpg.exceptions.SerializationError
        | asyncpg.exceptions.DeadlockDetectedError
        | asyncpg.exceptions.LockNotAvailableError
        | asyncpg.exceptions.QueryCanceledError,
    ):
        return "conflict"
    return "connection"


class PresignedStore:
    """Reads and writes of the pre-signed response store, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, replicas: ReplicaSet | None = None) -> None:
        self.pool = pool  # the primary: every write, and reads the replicas cannot answer
        self.replicas = replicas
        #: the schema has ct_index.not_after (migration 0005, expand-only): ``connect``
        #: looks once; a serial known only from CT then has a notAfter
        self.ct_not_after = False
        #: the schema has certificates.tbs_sha256 (migration 0006, expand-only):
        #: ``connect`` looks once; recording then refuses serial collisions
        self.tbs_fingerprints = False
        #: the schema has the responses_this_update index (migration 0007, expand-only):
        #: ``connect`` looks once; readiness's overdue count then reads by thisUpdate too
        self.this_update_index = False

    async def _read(
        self, query: str, issuer_id: int, key: bytes, found: Callable[[asyncpg.Record], bool]
    ) -> asyncpg.Record | None:
        """Read from a usable replica; when it has nothing (or fails), ask the primary.

        A replica may not have replayed a fresh recording yet, so its "nothing" is never
        final; see responder/replicas.py for when a replica is not asked at all.
        """
        replica = self.replicas.pick((issuer_id, key)) if self.replicas else None
        if replica is not None:
            try:
                row = await replica.fetchrow(query, issuer_id, key)
            except Exception as exc:  # a failing replica must not fail the lookup
                log.warning("replica read failed (%s); using the primary", type(exc).__name__)
                row = None
            if row is not None and found(row):
                return row
        return await self.pool.fetchrow(query, issuer_id, key)

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> PresignedStore:
        # timeout: connecting (a dead database answers nothing; requests must not hang)
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=10,
            timeout=5,
            reset=_keep_session,
            # every session commits durably; the writes also set it per transaction
            server_settings={"synchronous_commit": "on"},
        )
        assert pool is not None
        store = cls(pool)
        try:
            store.ct_not_after = await ct_index_has_not_after(pool)
            store.tbs_fingerprints = await certificates_has_tbs_sha256(pool)
            store.this_update_index = await responses_has_this_update_index(pool)
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        if self.replicas is not None:
            await self.replicas.close()
        await self.pool.close()

    async def register_issuers(self, issuers: Sequence[Issuer]) -> None:
        """Give each configured issuer its row id (DML only: serve may do this)."""

        async def op() -> None:
            async with self.pool.acquire() as conn:
                for issuer in issuers:
                    await conn.execute(
                        "INSERT INTO issuers (spki_sha256, name, subject) VALUES ($1, $2, $3) "
                        "ON CONFLICT (spki_sha256) DO NOTHING",
                        issuer.spki_sha256,
                        issuer.name,
                        issuer.certificate.subject.rfc4514_string(),
                    )
                    issuer.db_id = await conn.fetchval(
                        "SELECT id FROM issuers WHERE spki_sha256 = $1", issuer.spki_sha256
                    )

        await with_retries(op, "register issuers")

    async def fetch_response(self, issuer_id: int, serial: int) -> StoredResponse | None:
        """The pre-signed response row, if any (one primary-key read)."""
        row = await self._read(
            "SELECT der, status, this_update, next_update FROM responses "
            "WHERE issuer_id = $1 AND serial = $2",
            issuer_id,
            serial_key(serial),
            lambda _: True,
        )
        if row is None:
            return None
        return stored_response_from_row(row)

    async def refresh_statistics(self) -> bool:
        """ANALYZE the tables the serving lookups read, after a bulk load; False when this
        role may not (only the tables' owner may: then autovacuum does it, within minutes).

        Why: each pooled connection prepares the batched lookup once and, after five runs,
        keeps a generic plan made from the statistics of that moment. Made while the tables
        were nearly empty, that plan reads them sequentially (cheapest for a tiny table),
        and keeps doing so as a bulk load grows them, until an ANALYZE makes every
        connection plan again. Found in a load test: a lookup of 0.3 s, PostgreSQL at 100 %.
        """
        async with self.pool.acquire() as conn:
            owner = await conn.fetchval(
                "SELECT bool_and(pg_has_role(relowner, 'USAGE')) FROM pg_class "
                "WHERE oid IN ('certificates'::regclass, 'responses'::regclass)"
            )
            if not owner:
                return False
            # a sample of each table, but a cold or busy one may take longer than the
            # pool's 10 s command timeout
            await conn.execute("ANALYZE certificates, responses", timeout=600)
        return True

    async def recent_responses(
        self, limit: int, batch: int = 5000
    ) -> AsyncGenerator[list[tuple[int, int, StoredResponse]], None]:
        """The ``limit`` most recently signed responses (latest nextUpdate first), in
        batches of (issuer id, serial, response): what the warm-up loads into memory."""
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            cursor = await conn.cursor(
                "SELECT issuer_id, serial, der, status, this_update, next_update "
                "FROM responses ORDER BY next_update DESC LIMIT $1",
                limit,
            )
            while True:
                rows = await cursor.fetch(batch)
                if not rows:
                    return
                yield [
                    (
                        row["issuer_id"],
                        serial_from_key(row["serial"]),
                        stored_response_from_row(row),
                    )
                    for row in rows
                ]

    async def knowledge(self, issuer_id: int, serial: int) -> Knowledge:
        """Whether the serial was issued (recorded, or seen in CT) and its revocation."""
        # one round trip for everything on-demand signing needs (retention included)
        ct_not_after = "t.not_after" if self.ct_not_after else "NULL::timestamptz"
        row = await self._read(
            f"SELECT coalesce(c.not_after, {ct_not_after}) AS not_after, "
            "       c.serial IS NOT NULL AS recorded, t.serial IS NOT NULL AS in_ct, "
            "       EXISTS (SELECT 1 FROM responses WHERE issuer_id = $1 AND serial = $2) "
            "       AS has_response, "
            "       r.revoked_at, r.reason "
            "FROM (SELECT 1) AS one "
            "LEFT JOIN certificates c ON c.issuer_id = $1 AND c.serial = $2 "
            "LEFT JOIN ct_index t ON t.issuer_id = $1 AND t.serial = $2 "
            "LEFT JOIN revocations r ON r.issuer_id = $1 AND r.serial = $2",
            issuer_id,
            serial_key(serial),
            lambda r: bool(r["recorded"] or r["in_ct"]) or r["revoked_at"] is not None,
        )
        assert row is not None
        return knowledge_from_row(row, has_response=bool(row["has_response"]))

    async def store_responses(self, rows: Sequence[tuple[int, int, SignedResponse]]) -> None:
        """Write back responses signed on demand, (issuer id, serial, response) each, in one
        statement: never replaces a revoked row (with good, nor with a revoked one), nor a
        newer one with an older one; for one serial only the newest of the batch is offered.

        A response signed on demand was signed from what a lookup read moments before; a
        revocation changed since (a later keyCompromise, MRSP 6.1.1) commits its own
        re-signed row, and a write-back signed from the old revocation must not land over
        it: within one second both carry the same thisUpdate, so time alone cannot order
        them. Revoked rows are therefore written only by the paths that read or hold the
        revocation in the same transaction: ``record_revocation``, ``replace_revocation``
        and the refresher (which holds the row lock while it signs)."""
        newest: dict[tuple[int, bytes], SignedResponse] = {}
        for issuer_id, serial, signed in rows:
            key = (issuer_id, serial_key(serial))
            if key not in newest or newest[key].this_update <= signed.this_update:
                newest[key] = signed
        await self.pool.execute(
            "INSERT INTO responses (issuer_id, serial, status, this_update, next_update, der, "
            "                       signer) "
            "SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::smallint[], "
            "                     $4::timestamptz[], $5::timestamptz[], $6::bytea[], "
            "                     $7::bigint[]) "
            "ON CONFLICT (issuer_id, serial) DO UPDATE SET status = EXCLUDED.status, "
            "  this_update = EXCLUDED.this_update, next_update = EXCLUDED.next_update, "
            "  der = EXCLUDED.der, signer = EXCLUDED.signer "
            "WHERE responses.this_update <= EXCLUDED.this_update AND responses.status <> 1",
            [issuer_id for issuer_id, _ in newest],
            [serial for _, serial in newest],
            *response_arrays(list(newest.values())),
        )

    async def record_certificates(
        self, records: Sequence[tuple[CertificateRecord, SignedResponse]]
    ) -> list[Recorded]:
        """Record certificates and their signed responses in ONE transaction.

        Returns, per record, whether the serial was new (a serial given twice in one
        call is new once) and the response stored for it: the one given, or the one
        that was already there and was kept (a revoked one, say). The call returns only
        after the commit is durable (synchronous_commit forced on): the CA may publish.

        With migration 0006 (``tbs_fingerprints``), raises ``SerialCollision`` and writes
        nothing when a serial is held by a certificate with another fingerprint (recorded
        before, or earlier in this call); a row recorded before 0006 (NULL) takes the
        fingerprint of the next recording of its serial.
        """
        kinds: dict[tuple[int, bytes], int] = {}
        first: dict[tuple[int, bytes], tuple[CertificateRecord, SignedResponse]] = {}
        collisions: list[Collision] = []
        for index, (record, signed) in enumerate(records):
            key = (record.issuer_id, serial_key(record.serial))
            kind = KIND_PRECERTIFICATE if record.precertificate else KIND_CERTIFICATE
            kinds[key] = kinds.get(key, 0) | kind
            held = first.setdefault(key, (record, signed))[0].tbs_sha256
            submitted = record.tbs_sha256
            if held is not None and submitted is not None and held != submitted:
                collisions.append(
                    Collision(index, record.issuer_id, record.serial, held, submitted)
                )
        if collisions and self.tbs_fingerprints:
            raise SerialCollision(collisions)
        unique = list(first.items())
        fingerprints = self.tbs_fingerprints
        arrays = (
            [key[0] for key, _ in unique],
            [key[1] for key, _ in unique],
            [r.not_after for _, (r, _) in unique],
            [kinds[key] for key, _ in unique],
            *response_arrays([s for _, (_, s) in unique]),
            *([[r.tbs_sha256 for _, (r, _) in unique]] if fingerprints else []),
        )

        async def op() -> dict[tuple[int, bytes], tuple[bool, StoredState | None]]:
            async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                if not fingerprints:
                    rows = await conn.fetch(_RECORD_STATEMENTS[False], *arrays)
                    return await _recorded_states(conn, rows)
                # Serial collisions, race-free: ON CONFLICT locks each existing row (the
                # latest committed version; a concurrent INSERT of the same serial makes
                # this one wait for its commit, then conflict with it) and evaluates the
                # WHERE on that locked version, so a row whose fingerprint differs is
                # always updated and RETURNs the fingerprint it holds. Whichever of two
                # colliding recordings comes second sees the first's fingerprint and
                # rolls back: the explicit transaction undoes the rows this statement
                # wrote for the other certificates of the call too.
                async with conn.transaction():
                    rows = await conn.fetch(_RECORD_STATEMENTS[True], *arrays)
                    clash = _collisions(records, rows)
                    if clash:
                        raise SerialCollision(clash)
                    return await _recorded_states(conn, rows)

        states = await with_retries(op, "record certificates")
        recorded: list[Recorded] = []
        for record, signed in records:
            key = (record.issuer_id, serial_key(record.serial))
            inserted, state = states[key]
            states[key] = (False, state)  # a serial given twice is new once
            if state is None:  # deleted since (a retention purge): report what was sent
                state = StoredState(signed.status, signed.this_update, signed.next_update)
            recorded.append(Recorded(inserted, state))
        return recorded

    async def record_revocation(
        self, issuer_id: int, serial: int, revocation: Revocation, signed: SignedResponse
    ) -> bool:
        """Store a revocation and its revoked response together; False if already revoked."""

        async def op() -> bool:
            async with durable_transaction(self.pool) as conn:
                created = await conn.fetchval(
                    "INSERT INTO revocations (issuer_id, serial, revoked_at, reason) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (issuer_id, serial) DO NOTHING "
                    "RETURNING true",
                    issuer_id,
                    serial_key(serial),
                    revocation.revoked_at,
                    REASON_CODES[revocation.reason],
                )
                if created:
                    await _put_revoked_response(conn, issuer_id, serial, signed)
                await _notify_invalidation(conn, issuer_id, serial)
                return bool(created)

        return await with_retries(op, "record revocation")

    async def revocation_context(self, issuer_id: int, serial: int) -> RevocationContext:
        """What a revocation request is decided on, read from the primary (a replica that
        has not replayed an earlier revocation would make a repeat look like a first)."""

        async def op() -> RevocationContext:
            async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                row = await conn.fetchrow(
                    "SELECT c.serial IS NOT NULL AS recorded, t.serial IS NOT NULL AS in_ct, "
                    "       r.revoked_at, r.reason "
                    "FROM (SELECT 1) AS one "
                    "LEFT JOIN certificates c ON c.issuer_id = $1 AND c.serial = $2 "
                    "LEFT JOIN ct_index t ON t.issuer_id = $1 AND t.serial = $2 "
                    "LEFT JOIN revocations r ON r.issuer_id = $1 AND r.serial = $2",
                    issuer_id,
                    serial_key(serial),
                )
            assert row is not None
            revocation = None
            if row["revoked_at"] is not None:
                revocation = Revocation(row["revoked_at"], REASONS_BY_CODE[row["reason"]])
            return RevocationContext(
                known=bool(row["recorded"] or row["in_ct"]),
                revocation=revocation,
            )

        return await with_retries(op, "revocation lookup")

    async def issuers_knowing(self, serial: int, issuer_ids: Sequence[int]) -> list[int]:
        """Which of ``issuer_ids`` recorded ``serial`` or saw it in CT: asked only when a
        revocation names a serial its issuer does not know, so that the answer can say
        which issuer does (a revocation under the wrong issuer leaves the real
        certificate "good"). One probe of each primary key, no scan."""
        if not issuer_ids:
            return []

        async def op() -> list[int]:
            async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                rows = await conn.fetch(
                    "SELECT issuer_id FROM certificates "
                    "WHERE issuer_id = ANY($1::smallint[]) AND serial = $2 "
                    "UNION SELECT issuer_id FROM ct_index "
                    "WHERE issuer_id = ANY($1::smallint[]) AND serial = $2",
                    list(issuer_ids),
                    serial_key(serial),
                )
            return sorted(row["issuer_id"] for row in rows)

        return await with_retries(op, "revocation issuer lookup")

    async def replace_revocation(
        self,
        issuer_id: int,
        serial: int,
        stored: Revocation,
        revocation: Revocation,
        signed: SignedResponse,
    ) -> bool:
        """Change a stored revocation (a later keyCompromise, MRSP 6.1.1) and its revoked
        response in one transaction, with the same NOTIFY as a first revocation so every
        responder drops its cached copy at commit. Compare-and-set: False (nothing
        written) when the row is no longer ``stored``, so a concurrent change is never
        overwritten unseen."""

        async def op() -> bool:
            async with durable_transaction(self.pool) as conn:
                replaced = await conn.fetchval(
                    "UPDATE revocations SET revoked_at = $5, reason = $6 "
                    "WHERE issuer_id = $1 AND serial = $2 AND revoked_at = $3 AND reason = $4 "
                    "RETURNING true",
                    issuer_id,
                    serial_key(serial),
                    stored.revoked_at,
                    REASON_CODES[stored.reason],
                    revocation.revoked_at,
                    REASON_CODES[revocation.reason],
                )
                if not replaced:
                    return False
                await _put_revoked_response(conn, issuer_id, serial, signed)
                await _notify_invalidation(conn, issuer_id, serial)
                return True

        return await with_retries(op, "replace revocation")


def _record_statement(fingerprints: bool) -> str:
    """The one statement that records a batch (docs/recording.md, "The write"): one
    round trip, both INSERTs in CTEs. The session has synchronous_commit = on (pool
    server_settings) and the statement sets it for its own transaction too, whatever
    the server default. With ``fingerprints`` (migration 0006) it also stores
    ``tbs_sha256`` ($10), adopts it into a row that has none, and returns the
    fingerprint each existing row holds (``held``) for the collision check."""
    if fingerprints:
        cert = (
            "  INSERT INTO certificates (issuer_id, serial, not_after, kinds, tbs_sha256) "
            "  SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::timestamptz[], "
            "                       $4::smallint[], $10::bytea[]) "
            "  ON CONFLICT (issuer_id, serial) DO UPDATE "
            "    SET kinds = certificates.kinds | EXCLUDED.kinds, "
            "        tbs_sha256 = coalesce(certificates.tbs_sha256, EXCLUDED.tbs_sha256) "
            "    WHERE certificates.kinds | EXCLUDED.kinds <> certificates.kinds "
            "       OR (EXCLUDED.tbs_sha256 IS NOT NULL "
            "           AND certificates.tbs_sha256 IS DISTINCT FROM EXCLUDED.tbs_sha256) "
            "  RETURNING issuer_id, serial, (xmax = 0) AS inserted, tbs_sha256 AS held), "
        )
        held = "cert.held"
    else:
        cert = (
            "  INSERT INTO certificates (issuer_id, serial, not_after, kinds) "
            "  SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::timestamptz[], "
            "                       $4::smallint[]) "
            "  ON CONFLICT (issuer_id, serial) DO UPDATE "
            "    SET kinds = certificates.kinds | EXCLUDED.kinds "
            "    WHERE certificates.kinds | EXCLUDED.kinds <> certificates.kinds "
            "  RETURNING issuer_id, serial, (xmax = 0) AS inserted), "
        )
        held = "NULL::bytea"
    return (
        "WITH durable AS (SELECT set_config('synchronous_commit', 'on', true)), "
        "cert AS (" + cert + "resp AS ("
        "  INSERT INTO responses (issuer_id, serial, status, this_update, "
        "                         next_update, der, signer) "
        "  SELECT * FROM unnest($1::smallint[], $2::bytea[], $5::smallint[], "
        "                       $6::timestamptz[], $7::timestamptz[], $8::bytea[], "
        "                       $9::bigint[]) "
        "  ON CONFLICT (issuer_id, serial) DO NOTHING "
        "  RETURNING issuer_id, serial, status, this_update, next_update) "
        # per serial: new or not, and the response row that stands after this
        # statement (inserted here, else the one its snapshot saw)
        "SELECT k.issuer_id, k.serial, coalesce(cert.inserted, false) AS inserted, "
        f"       {held} AS held, "
        "       coalesce(resp.status, r.status) AS status, "
        "       coalesce(resp.this_update, r.this_update) AS this_update, "
        "       coalesce(resp.next_update, r.next_update) AS next_update, "
        "       (SELECT count(*) FROM durable) AS durable "
        "FROM unnest($1::smallint[], $2::bytea[]) AS k (issuer_id, serial) "
        "LEFT JOIN cert USING (issuer_id, serial) "
        "LEFT JOIN resp USING (issuer_id, serial) "
        "LEFT JOIN responses r USING (issuer_id, serial)"
    )


#: by ``PresignedStore.tbs_fingerprints``: whether migration 0006 has run
_RECORD_STATEMENTS = {flag: _record_statement(flag) for flag in (False, True)}


def _collisions(
    records: Sequence[tuple[CertificateRecord, SignedResponse]], rows: Sequence[asyncpg.Record]
) -> list[Collision]:
    """The records whose serial the statement found held by another fingerprint."""
    held = {
        (row["issuer_id"], bytes(row["serial"])): bytes(row["held"])
        for row in rows
        if row["held"] is not None
    }
    found = []
    for index, (record, _) in enumerate(records):
        stored = held.get((record.issuer_id, serial_key(record.serial)))
        if stored is not None and record.tbs_sha256 is not None and stored != record.tbs_sha256:
            found.append(
                Collision(index, record.issuer_id, record.serial, stored, record.tbs_sha256)
            )
    return found


async def _recorded_states(
    conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]
) -> dict[tuple[int, bytes], tuple[bool, StoredState | None]]:
    """Per (issuer id, serial key): new or not, and the stored response's state."""
    states = {
        (row["issuer_id"], bytes(row["serial"])): (
            row["inserted"],
            None if row["status"] is None else stored_state_from_row(row),
        )
        for row in rows
    }
    # a response committed by another transaction after this statement's
    # snapshot (it made the INSERT do nothing): read it now, committed
    late = [key for key, (_, state) in states.items() if state is None]
    if late:
        for row in await conn.fetch(
            "SELECT issuer_id, serial, status, this_update, next_update "
            "FROM responses r JOIN unnest($1::smallint[], $2::bytea[]) "
            "AS k (issuer_id, serial) USING (issuer_id, serial)",
            [key[0] for key in late],
            [key[1] for key in late],
        ):
            key = (row["issuer_id"], bytes(row["serial"]))
            states[key] = (states[key][0], stored_state_from_row(row))
    return states
