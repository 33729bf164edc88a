"""Versioned schema migrations, applied by ``ocsp-responder migrate`` and nothing else.

``serve`` never issues DDL (the 2025 incident was a restart-time ALTER TABLE racing with
inserts): it only checks that the schema is at least the version this build needs.
Migrations run under a PostgreSQL advisory lock (one migrator at a time) with a short
``lock_timeout`` so that a migration waiting for a busy table gives up and retries instead
of queueing every writer behind it. Rules for writing migrations: docs/migrations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

#: pg_advisory_lock key: "OCSPMIGR" as a 63-bit integer.
ADVISORY_LOCK_KEY = 0x4F43_5350_4D49_4752
LOCK_TIMEOUT = "2s"
NO_TRANSACTION_MARK = "-- migrate: no-transaction"
#: An expand migration only adds what this build does not yet rely on, so ``serve`` also
#: runs on the schema just before it (rolling deploys: migrate while the old code serves).
EXPAND_MARK = "-- migrate: expand"
#: A contract migration removes or changes what older builds use (a dropped column): a
#: build that does not know it refuses to run on a schema that has it (``check_schema``).
#: ``migrate`` records the mark in ``schema_migrations.contract``, where older builds read it.
CONTRACT_MARK = "-- migrate: contract"
#: Whole ``migrate`` runs tried again after lost connections (a restarted server, a
#: terminated backend); every step is idempotent, so starting over is safe.
CONNECTION_ATTEMPTS = 5


class SchemaError(Exception):
    """The database schema is missing or older than this build needs."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        """CREATE INDEX CONCURRENTLY cannot run in a transaction; such files opt out."""
        return NO_TRANSACTION_MARK not in self.sql

    @property
    def expand(self) -> bool:
        return EXPAND_MARK in self.sql

    @property
    def contract(self) -> bool:
        return CONTRACT_MARK in self.sql


def load_migrations() -> list[Migration]:
    files = resources.files("responder") / "migrations"
    found: list[Migration] = []
    for entry in files.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"migration versions are not 1..N without gaps: {versions}")
    return found


def minimum_version(migrations: list[Migration]) -> int:
    """The oldest schema this build can serve on: trailing expand migrations are optional."""
    version = len(migrations)
    while version > 1 and migrations[version - 1].expand:
        version -= 1
    return version


#: The newest schema this build knows (``migrate`` brings a database here).
REQUIRED_VERSION = len(load_migrations())
#: The oldest schema ``serve`` accepts (see EXPAND_MARK).
MINIMUM_VERSION = minimum_version(load_migrations())


async def current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def has_column(executor: asyncpg.Pool | asyncpg.Connection, table: str, column: str) -> bool:
    """Whether ``table.column`` exists: how a build finds out that an expand migration
    it can use (but does not need) has run."""
    return bool(
        await executor.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1 "
            "AND column_name = $2)",
            table,
            column,
        )
    )


async def index_valid(executor: asyncpg.Pool | asyncpg.Connection, name: str) -> bool | None:
    """Whether the index ``name`` (on the search path) is valid; None when there is none.
    A CONCURRENTLY build that was interrupted leaves an invalid one: the planner never
    uses it, and ``migrate`` drops it to build it again."""
    valid: bool | None = await executor.fetchval(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = $1 AND pg_table_is_visible(c.oid)",
        name,
    )
    return valid


async def has_index(executor: asyncpg.Pool | asyncpg.Connection, name: str) -> bool:
    """Whether the index ``name`` exists and is valid (usable by the planner)."""
    return await index_valid(executor, name) is True


async def responses_has_this_update_index(executor: asyncpg.Pool | asyncpg.Connection) -> bool:
    """Whether migration 0007 (expand-only) has run: only then does the refresher also
    look for responses by thisUpdate (a scan by it without the index would read the
    whole table every pass); a process looks once, when its refresher starts."""
    return await has_index(executor, "responses_this_update")


async def ct_index_has_not_after(executor: asyncpg.Pool | asyncpg.Connection) -> bool:
    """Whether migration 0005 (expand-only) has run: ``ct_index.not_after`` is read and
    written only then; a process looks once, at its first use (restart after migrate)."""
    return await has_column(executor, "ct_index", "not_after")


async def certificates_has_tbs_sha256(executor: asyncpg.Pool | asyncpg.Connection) -> bool:
    """Whether migration 0006 (expand-only) has run: recording stores and compares
    ``certificates.tbs_sha256`` (serial collisions) only then; a process looks once, when
    it connects (restart after migrate)."""
    return await has_column(executor, "certificates", "tbs_sha256")


async def check_schema(conn: asyncpg.Connection) -> int:
    """Fail clearly when the schema is behind this build, or ahead of it by a migration
    that removed what this build uses; never fix it from here."""
    version = await current_version(conn)
    if version > REQUIRED_VERSION:
        await _check_newer_schema(conn, version)
    if version < MINIMUM_VERSION:
        raise SchemaError(
            f"database schema is at version {version}, this build needs {REQUIRED_VERSION}: "
            "run `ocsp-responder migrate` (as a role allowed to change the schema)"
        )
    if version < REQUIRED_VERSION:
        log.warning(
            "database schema is at version %d; this build runs on it but knows %d: "
            "run `ocsp-responder migrate`",
            version,
            REQUIRED_VERSION,
        )
    return version


async def _check_newer_schema(conn: asyncpg.Connection, version: int) -> None:
    """A schema newer than this build: fine while its newer migrations only add (a rolling
    deploy migrates first, while the old build serves, and old instances may restart then);
    refused when one of them is a contract migration (this build would fail on what it
    removed, statement by statement, while looking ready)."""
    contracts = []
    if await has_column(conn, "schema_migrations", "contract"):
        contracts = await conn.fetch(
            "SELECT version, name FROM schema_migrations WHERE version > $1 AND contract "
            "ORDER BY version",
            REQUIRED_VERSION,
        )
    if contracts:
        first = contracts[0]
        raise SchemaError(
            f"database schema is at version {version}, newer than this build (which knows "
            f"{REQUIRED_VERSION}), and migration {first['version']:04d}_{first['name']} "
            "removed what older builds use: run a build that knows it"
        )
    log.warning(
        "database schema is at version %d, newer than this build knows (%d): fine during "
        "a rolling deploy (its newer migrations only add); deploy the newer build",
        version,
        REQUIRED_VERSION,
    )


#: A lost or broken connection (restart, pg_terminate_backend, a protocol left mid-way).
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)


async def migrate(dsn: str, *, target: int | None = None, attempts: int = 30) -> list[int]:
    """Apply pending migrations up to ``target`` (default: all); returns the versions
    applied. Safe to run concurrently and while serving; starts over (idempotently) when
    its connection is lost."""
    known = load_migrations()
    goal = len(known) if target is None else target
    if not 0 <= goal <= len(known):
        raise SchemaError(f"target version {goal} is not between 0 and {len(known)}")
    applied: list[int] = []
    for round_ in range(1, CONNECTION_ATTEMPTS + 1):
        try:
            await _migrate_once(dsn, known, goal, attempts, applied)
            return applied
        except _CONNECTION_ERRORS as exc:
            if round_ == CONNECTION_ATTEMPTS:
                raise SchemaError(
                    f"migration interrupted {round_} times, last by {type(exc).__name__}: "
                    f"{exc}; run `ocsp-responder migrate` again (it resumes where it stopped)"
                ) from exc
            log.warning("migrate: lost the database (%s); starting over", type(exc).__name__)
            await asyncio.sleep(0.5 * round_)
    raise AssertionError("unreachable")


async def _migrate_once(
    dsn: str, known: list[Migration], goal: int, attempts: int, applied: list[int]
) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        await _advisory_lock(conn, attempts)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = await current_version(conn)
            if done > len(known):  # "up to date" would hide that this build is the older
                log.warning(
                    "migrate: the schema is at version %d, newer than this build knows (%d): "
                    "nothing to apply",
                    done,
                    len(known),
                )
            pending = [m for m in known if done < m.version <= goal]
            if pending:  # nothing to apply: no DDL (it would wait behind a pg_dump)
                await _add_contract_column(conn, attempts)
            for migration in pending:
                await _apply(conn, migration, attempts)
                applied.append(migration.version)
                log.info("applied migration %04d_%s", migration.version, migration.name)
        finally:
            # the lock is per session: if the connection broke, closing it releases it
            with contextlib.suppress(*_CONNECTION_ERRORS, asyncpg.PostgresError):
                await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    finally:
        try:
            await conn.close(timeout=5)
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
            conn.terminate()


async def _advisory_lock(conn: asyncpg.Connection, attempts: int) -> None:
    """One migrator at a time. A waiter polls with pg_try_advisory_lock instead of
    blocking inside a statement: a blocked statement is an open transaction, which
    CREATE INDEX CONCURRENTLY in the running migrator would wait for (a deadlock)."""
    deadline = asyncio.get_running_loop().time() + attempts * 2.0
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
        if asyncio.get_running_loop().time() > deadline:
            raise SchemaError(
                "another `ocsp-responder migrate` holds the migration lock; try again later"
            )
        await asyncio.sleep(0.2)


async def _apply(
    conn: asyncpg.Connection, migration: Migration, attempts: int, *, record: bool = True
) -> None:
    """Apply one migration, retrying when its lock_timeout expires behind busy writers."""
    for attempt in range(1, attempts + 1):
        try:
            if migration.transactional:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    if record:
                        await _record_applied(conn, migration)
            else:
                await _drop_invalid_indexes(conn, migration)
                for statement in _statements(migration.sql):
                    await conn.execute(statement)
                if record:
                    await _record_applied(conn, migration)
            return
        except (
            asyncpg.exceptions.LockNotAvailableError,
            asyncpg.exceptions.QueryCanceledError,
            asyncpg.exceptions.DeadlockDetectedError,
        ):
            if attempt == attempts:
                raise SchemaError(
                    f"migration {migration.version:04d}_{migration.name} could not get its "
                    f"locks in {attempts} tries of {LOCK_TIMEOUT}: the table is too busy; "
                    "run `ocsp-responder migrate` again later"
                ) from None
            log.warning(
                "migration %04d waited %s for a lock; retrying (%d/%d)",
                migration.version,
                LOCK_TIMEOUT,
                attempt,
                attempts,
            )
            await asyncio.sleep(min(0.2 * attempt, 2.0))


async def _add_contract_column(conn: asyncpg.Connection, attempts: int) -> None:
    """Add ``schema_migrations.contract``, where builds that do not know a contract
    migration learn of it (tables created before it lack it; catalog-only, once), before
    the first migration is recorded. Its lock waits like a migration's: retried on
    ``lock_timeout`` behind a long reader (a pg_dump holds every table for hours)."""
    if await has_column(conn, "schema_migrations", "contract"):
        return
    await _apply(
        conn,
        Migration(
            0,
            "schema_migrations_contract",
            "ALTER TABLE schema_migrations "
            "ADD COLUMN IF NOT EXISTS contract boolean NOT NULL DEFAULT false",
        ),
        attempts,
        record=False,
    )


async def _record_applied(conn: asyncpg.Connection, migration: Migration) -> None:
    await conn.execute(
        "INSERT INTO schema_migrations (version, name, contract) VALUES ($1, $2, $3)",
        migration.version,
        migration.name,
        migration.contract,
    )


_CONCURRENT_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.I
)


async def _drop_invalid_indexes(conn: asyncpg.Connection, migration: Migration) -> None:
    """An interrupted CREATE INDEX CONCURRENTLY leaves an INVALID index that IF NOT EXISTS
    would then keep forever: drop those (concurrently) so the retry builds them again."""
    for name in _CONCURRENT_INDEX.findall(migration.sql):
        if await index_valid(conn, name) is False:
            log.warning("dropping invalid index %s left by an interrupted migration", name)
            await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')


def _statements(sql: str) -> list[str]:
    """Split a no-transaction migration into statements (they must be idempotent)."""
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]
