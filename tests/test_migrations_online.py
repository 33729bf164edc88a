"""Migrations that are safe while serving and recording (rules: docs/migrations.md)."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import httpx

from responder.schema import (
    EXPAND_MARK,
    MINIMUM_VERSION,
    NO_TRANSACTION_MARK,
    REQUIRED_VERSION,
    load_migrations,
    migrate,
)
from responder.store import serial_key
from signer.recording import tbs_fingerprint
from tests.support import (
    VENV_BIN,
    IssuerFiles,
    build_request,
    check_response,
    create_database,
    get_url,
    sql_sync,
    write_config,
)

# DDL that rewrites a table or holds a lock that blocks writers for the whole operation.
UNSAFE = {
    r"\bCREATE\s+(UNIQUE\s+)?INDEX\s+(?!CONCURRENTLY)": "CREATE INDEX without CONCURRENTLY",
    r"\bALTER\s+COLUMN\s+\w+\s+(SET\s+DATA\s+)?TYPE\b": "column type change (table rewrite)",
    r"\bSET\s+NOT\s+NULL\b": "SET NOT NULL (full scan under ACCESS EXCLUSIVE)",
    r"\bADD\s+COLUMN\b[^;]*\bNOT\s+NULL\b(?![^;]*\bDEFAULT\b)": "NOT NULL column without default",
    r"\bDEFAULT\s+(random|clock_timestamp|gen_random_uuid|uuid_generate)\w*\s*\(": (
        "volatile default (table rewrite)"
    ),
    r"\bADD\s+(CONSTRAINT\s+\w+\s+)?(FOREIGN\s+KEY|CHECK)\b(?![^;]*\bNOT\s+VALID\b)": (
        "constraint without NOT VALID"
    ),
    r"\bVACUUM\s+FULL\b|\bCLUSTER\b|\bLOCK\s+TABLE\b": "rewrite or explicit lock",
}


def test_every_later_migration_is_online_safe() -> None:
    """0001 creates the tables (nothing is busy yet); every later file must be online-safe."""
    for migration in load_migrations()[1:]:
        body = "\n".join(
            line for line in migration.sql.splitlines() if not line.strip().startswith("--")
        )
        # a table created by this very migration is new and empty: nothing to block yet
        new_tables = set(
            re.findall(r"\bCREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", body, re.I)
        )
        checked = ";".join(
            statement
            for statement in body.split(";")
            if not (
                (target := re.search(r"\bINDEX\b[^;]*?\bON\s+(?:ONLY\s+)?(\w+)", statement, re.I))
                and target[1] in new_tables
            )
        )
        for pattern, why in UNSAFE.items():
            assert not re.search(pattern, checked, re.I), f"{migration.name}: {why}"
        if re.search(r"\bCONCURRENTLY\b", body, re.I):
            assert NO_TRANSACTION_MARK in migration.sql, (
                f"{migration.name}: CONCURRENTLY needs '{NO_TRANSACTION_MARK}'"
            )
        if not migration.transactional:
            for statement in re.split(r";", body):
                if statement.strip():
                    assert re.search(r"IF\s+(NOT\s+)?EXISTS", statement, re.I), (
                        f"{migration.name}: no-transaction statements must be idempotent: "
                        f"{statement.strip()[:60]}"
                    )


def test_the_unsafe_patterns_catch_unsafe_ddl() -> None:
    for bad in (
        "CREATE INDEX x ON certificates (serial)",
        "ALTER TABLE certificates ALTER COLUMN kinds TYPE integer",
        "ALTER TABLE certificates ALTER COLUMN x SET NOT NULL",
        "ALTER TABLE certificates ADD COLUMN y int NOT NULL",
        "ALTER TABLE certificates ADD COLUMN z uuid DEFAULT gen_random_uuid()",
        "ALTER TABLE certificates ADD CONSTRAINT c CHECK (kinds > 0)",
    ):
        assert any(re.search(p, bad, re.I) for p in UNSAFE), bad
    for good in (
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS x ON certificates (serial)",
        "ALTER TABLE certificates ADD COLUMN IF NOT EXISTS y timestamptz",
        "ALTER TABLE certificates ADD COLUMN y int NOT NULL DEFAULT 0",
        "ALTER TABLE certificates ADD CONSTRAINT c CHECK (kinds > 0) NOT VALID",
    ):
        assert not any(re.search(p, good, re.I) for p in UNSAFE), good


def test_migrate_target_and_serving_on_the_schema_before_an_expand_migration(
    pg_admin_dsn: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    dsn = create_database(pg_admin_dsn, migrated=False)
    proc = write_config(tmp_path, dsn, [p256_issuer])
    cmd = [str(VENV_BIN / "ocsp-responder"), "migrate", "--config", str(proc.config_path)]
    bad = subprocess.run([*cmd, "--target", "99"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "target version 99" in bad.stderr
    first = subprocess.run(
        [*cmd, "--target", str(MINIMUM_VERSION)], capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 0, first.stderr
    assert sql_sync(dsn, "SELECT max(version) AS v FROM schema_migrations")[0]["v"] == (
        MINIMUM_VERSION
    )
    # serve runs on the older schema while later migrations are expand-only
    proc.start()
    try:
        cert = p256_issuer.ca.issue_leaf("before-expand.test")
        assert proc.record(cert).status_code == 201
        rest = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert rest.returncode == 0, rest.stderr
        if REQUIRED_VERSION > MINIMUM_VERSION:
            assert "applied migrations" in rest.stdout
            assert f"this build runs on it but knows {REQUIRED_VERSION}" in proc.log()
        after = p256_issuer.ca.issue_leaf("after-expand.test")
        assert proc.record(after).status_code == 201
        for c in (cert, after):
            resp = httpx.get(get_url(proc.url, build_request(c, p256_issuer.ca.ca_cert)))
            check_response(resp.content, issuer=p256_issuer, serial=c.serial_number)
        # 0006 (certificates.tbs_sha256) ran under this process, which looked at start:
        # it records as before, without fingerprints, so a collision still gets through
        collider = p256_issuer.ca.issue_leaf("collider.test", serial=cert.serial_number)
        assert proc.record(collider).status_code == 200
        proc.stop()
        # restarted, it uses the column: the rows from before have none, and the next
        # recording of their serial gives them one; then another certificate collides
        proc.start()
        assert proc.record(cert).status_code == 200
        assert proc.record(collider).status_code == 409
        assert proc.record(after).status_code == 200
        [row] = sql_sync(
            dsn,
            "SELECT tbs_sha256 FROM certificates WHERE serial = $1",
            serial_key(cert.serial_number),
        )
        assert row["tbs_sha256"] == tbs_fingerprint(cert)
    finally:
        proc.stop()
    assert all(m.expand for m in load_migrations()[MINIMUM_VERSION:])
    assert EXPAND_MARK  # the marker docs/migrations.md describes


def test_an_interrupted_concurrent_index_is_rebuilt(pg_admin_dsn: str) -> None:
    """CREATE INDEX CONCURRENTLY killed half-way leaves an INVALID index; IF NOT EXISTS
    alone would keep it forever. migrate drops it and builds the real one."""
    concurrent = [m for m in load_migrations() if "CONCURRENTLY" in m.sql]
    assert concurrent, "no CONCURRENTLY migration to exercise"
    migration = concurrent[0]
    name = re.search(r"CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+(\w+)", migration.sql)
    assert name is not None
    index = name[1]
    dsn = create_database(pg_admin_dsn, migrated=False)
    asyncio.run(migrate(dsn, target=migration.version - 1))
    sql_sync(
        dsn,
        "INSERT INTO issuers (spki_sha256, name, subject) VALUES ($1, 'i', 'i')",
        b"\x01" * 32,
    )
    sql_sync(
        dsn,
        "INSERT INTO certificates (issuer_id, serial, not_after, kinds) "
        "SELECT 1, int4send(g), now(), 2 FROM generate_series(1, 3) g",
    )
    # a unique index on duplicate values fails after the catalog entry exists: INVALID
    try:
        sql_sync(dsn, f"CREATE UNIQUE INDEX CONCURRENTLY {index} ON certificates (kinds)")
    except Exception as exc:
        assert "could not create unique index" in str(exc)
    assert not sql_sync(
        dsn,
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = $1",
        index,
    )[0]["indisvalid"]
    asyncio.run(migrate(dsn))
    row = sql_sync(
        dsn,
        "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) AS def FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = $1",
        index,
    )[0]
    assert row["indisvalid"] and "UNIQUE" not in row["def"]


def test_ct_not_after_is_used_only_once_its_expand_migration_ran(pg_admin_dsn: str) -> None:
    """Migration 0005 (ct_index.not_after) is expand-only: before it, the CT index, the
    batched lookup, the single-row knowledge read and the refresher's queries run as
    before; after it (a new connection looks again), the logged notAfter is stored and
    read back as the knowledge's notAfter."""
    import datetime as dt

    from responder.ct_index_store import CTIndexStore, IndexRow
    from responder.refresh_store import RefreshStore, Window
    from responder.store import PresignedStore
    from responder.store_lookup import BatchedLookup
    from signer.response_builder import ValidityPolicy

    [before_0005] = [m.version - 1 for m in load_migrations() if "ct_index_not_after" in m.name]
    dsn = create_database(pg_admin_dsn, migrated=False)
    asyncio.run(migrate(dsn, target=before_0005))
    not_after = dt.datetime(2031, 5, 17, 12, 0, tzinfo=dt.UTC)

    async def exercise(serial: int) -> tuple[bool, dt.datetime | None, dt.datetime | None]:
        store = await PresignedStore.connect(dsn, max_size=2)
        try:
            await store.pool.execute(
                "INSERT INTO issuers (id, spki_sha256, name, subject) "
                "VALUES (1, $1, 'i', 'CN=i') ON CONFLICT DO NOTHING",
                bytes(32),
            )
            ct = CTIndexStore(store.pool)
            log = await ct.ensure_log(bytes(32), "log", "http://log.test")
            row = IndexRow(1, serial, 0, "precert", 1_700_000_000_000, int(not_after.timestamp()))
            await ct.commit_batch(log.db_id, "log", log.next_index, [row], "{}", 1, 1)
            found = await BatchedLookup(store).get(1, serial)
            single = await store.knowledge(1, serial)
            assert found.knowledge.known and found.knowledge.ct_only and single.ct_only
            window = Window(
                dt.datetime.now(dt.UTC), ValidityPolicy(), dt.timedelta(0), dt.timedelta(days=7)
            )
            await RefreshStore(store.pool).freshness(window, {1: []}, 100)
            return store.ct_not_after, found.knowledge.not_after, single.not_after
        finally:
            await store.close()

    assert asyncio.run(exercise(0x0A11)) == (False, None, None)
    asyncio.run(migrate(dsn))
    assert asyncio.run(exercise(0x0B22)) == (True, not_after, not_after)
