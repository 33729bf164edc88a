"""Versioned schema migrations, applied by ``ocsp-responder migrate`` and nothing else.

``serve`` never issues DDL (the 2025 incident was a restart-time ALTER TABLE racing with
inserts): it only checks that the schema is at least the version this build needs.
Migrations run under a PostgreSQL advisory lock (one migrator at a time) with a short
``lock_timeout`` so that a migration waiting for a busy table gives up and retries instead
of queueing every writer behind it. Rules for writing migrations: docs/migrations.md.
"""

from __future__ import annotations

import asyncio
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


REQUIRED_VERSION = len(load_migrations())


async def current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def check_schema(conn: asyncpg.Connection) -> int:
    """Fail clearly when the schema is behind this build; never fix it from here."""
    version = await current_version(conn)
    if version < REQUIRED_VERSION:
        raise SchemaError(
            f"database schema is at version {version}, this build needs {REQUIRED_VERSION}: "
            "run `ocsp-responder migrate` (as a role allowed to change the schema)"
        )
    return version


async def migrate(dsn: str, *, attempts: int = 30) -> list[int]:
    """Apply pending migrations; returns the versions applied. Safe to run concurrently."""
    conn = await asyncpg.connect(dsn)
    applied: list[int] = []
    try:
        await conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        # poll rather than block in pg_advisory_lock: a session blocked in a statement
        # holds a snapshot, and CREATE INDEX CONCURRENTLY in the migrator holding the lock
        # would wait for that snapshot while it waits for the lock (a deadlock)
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
            await asyncio.sleep(0.1)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = await current_version(conn)
            for migration in load_migrations():
                if migration.version <= done:
                    continue
                await _apply(conn, migration, attempts)
                applied.append(migration.version)
                log.info("applied migration %04d_%s", migration.version, migration.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    finally:
        await conn.close()
    return applied


async def _apply(conn: asyncpg.Connection, migration: Migration, attempts: int) -> None:
    """Apply one migration, retrying when its lock_timeout expires behind busy writers."""
    for attempt in range(1, attempts + 1):
        try:
            if migration.transactional:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
            else:
                for statement in _statements(migration.sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            return
        except asyncpg.exceptions.LockNotAvailableError:
            if attempt == attempts:
                raise
            log.warning(
                "migration %04d waited %s for a lock; retrying (%d/%d)",
                migration.version,
                LOCK_TIMEOUT,
                attempt,
                attempts,
            )
            await asyncio.sleep(min(0.2 * attempt, 2.0))


def _statements(sql: str) -> list[str]:
    """Split a no-transaction migration into statements (they must be idempotent)."""
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]
