"""Schema: versioned migrations under an advisory lock; serve never needs DDL."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from responder.schema import CONTRACT_MARK, REQUIRED_VERSION, Migration, migrate
from tests.support import (
    VENV_BIN,
    build_request,
    check_response,
    create_database,
    get_url,
    run_async,
    sql_sync,
    write_config,
)


def test_migrate_is_idempotent_and_versioned(pg_admin_dsn):  # type: ignore[no-untyped-def]
    dsn = create_database(pg_admin_dsn, migrated=False)
    assert run_async(migrate(dsn)) == list(range(1, REQUIRED_VERSION + 1))
    assert run_async(migrate(dsn)) == []
    versions = [
        r["version"] for r in sql_sync(dsn, "SELECT version FROM schema_migrations ORDER BY 1")
    ]
    assert versions == list(range(1, REQUIRED_VERSION + 1))


def test_concurrent_migrations_serialise(pg_admin_dsn):  # type: ignore[no-untyped-def]
    import asyncio

    dsn = create_database(pg_admin_dsn, migrated=False)

    async def both():  # type: ignore[no-untyped-def]
        return await asyncio.gather(migrate(dsn), migrate(dsn), migrate(dsn))

    results = run_async(both())
    assert sorted(v for r in results for v in r) == list(range(1, REQUIRED_VERSION + 1))


def test_serve_refuses_unmigrated_schema(pg_admin_dsn, p256_issuer, tmp_path):  # type: ignore[no-untyped-def]
    dsn = create_database(pg_admin_dsn, migrated=False)
    proc = write_config(tmp_path, dsn, [p256_issuer])
    result = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(proc.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "schema is at version 0" in result.stderr and "ocsp-responder migrate" in result.stderr
    assert "Traceback" not in result.stderr
    assert sql_sync(dsn, "SELECT to_regclass('responses') IS NULL AS missing")[0]["missing"]


def test_serve_as_role_without_ddl(pg_admin_dsn, p256_issuer, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The serving role may read and write rows, never change the schema; serve works."""
    dsn = create_database(pg_admin_dsn)
    role = "ocsp_serve_" + tmp_path.name[-6:].lower().replace("-", "_")
    sql_sync(dsn, f"CREATE ROLE {role} LOGIN")
    sql_sync(dsn, f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}")
    sql_sync(dsn, f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    base, _, dbname = dsn.rpartition("/")
    host = base.split("@", 1)[1]
    role_dsn = f"postgresql://{role}@{host}/{dbname}"
    # the role really cannot do DDL
    import asyncpg
    import pytest

    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
        sql_sync(role_dsn, "CREATE TABLE nope (x int)")
    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
        sql_sync(role_dsn, "ALTER TABLE certificates ADD COLUMN nope int")
    proc = write_config(tmp_path, role_dsn, [p256_issuer]).start()
    try:
        cert = p256_issuer.ca.issue_leaf("role.test")
        assert proc.record(cert).status_code == 201
        resp = httpx.get(get_url(proc.url, build_request(cert, p256_issuer.ca.ca_cert)))
        check_response(resp.content, issuer=p256_issuer, serial=cert.serial_number)
        assert "ERROR" not in proc.log()
    finally:
        proc.stop()
    # nor ANALYZE the tables (owner only): `import` then says so instead of failing
    from responder.store import PresignedStore

    async def analyze(dsn: str) -> bool:
        store = await PresignedStore.connect(dsn, max_size=1, min_size=1)
        try:
            return await store.refresh_statistics()
        finally:
            await store.close()

    assert run_async(analyze(role_dsn)) is False
    assert run_async(analyze(dsn)) is True  # the owner may


def test_serve_on_a_newer_schema_warns_or_refuses(pg_admin_dsn, p256_issuer, tmp_path):  # type: ignore[no-untyped-def]
    """A schema ahead of the build: served (a rolling deploy migrates first, and old
    instances restart meanwhile) with a WARNING naming both versions, unless a newer
    migration is a contract one, which removed what older builds use: then a clear
    refusal. Before, both started silently."""
    dsn = create_database(pg_admin_dsn)
    future = REQUIRED_VERSION + 1
    sql_sync(
        dsn,
        "INSERT INTO schema_migrations (version, name, contract) VALUES ($1, 'add_thing', false)",
        future,
    )
    proc = write_config(tmp_path, dsn, [p256_issuer]).start()
    try:
        assert proc.ready().status_code == 200
    finally:
        proc.stop()
    assert f"database schema is at version {future}, newer than this build knows" in proc.log()
    result = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "migrate", "--config", str(proc.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"the schema is at version {future}, newer than this build knows" in result.stderr
    sql_sync(
        dsn,
        "INSERT INTO schema_migrations (version, name, contract) VALUES ($1, 'drop_x', true)",
        future + 1,
    )
    for command in ("serve", "issue"):
        args = [command, "--config", str(proc.config_path)]
        if command == "issue":
            args.append(str(p256_issuer.ca_pem))
        result = subprocess.run(
            [str(VENV_BIN / "ocsp-responder"), *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(
            f"ocsp-responder: error: database schema is at version {future + 1}, newer than "
            f"this build (which knows {REQUIRED_VERSION}), and migration "
            f"{future + 1:04d}_drop_x removed what older builds use"
        ), result.stderr
        assert "Traceback" not in result.stderr


def test_migrate_records_contract_migrations(pg_admin_dsn) -> None:  # type: ignore[no-untyped-def]
    """Older builds learn of a contract migration from schema_migrations.contract, which
    migrate adds to a table created before it."""
    dsn = create_database(pg_admin_dsn, migrated=False)
    run_async(migrate(dsn, target=1))
    sql_sync(dsn, "ALTER TABLE schema_migrations DROP COLUMN contract")  # an older table
    run_async(migrate(dsn))
    rows = sql_sync(dsn, "SELECT version, contract FROM schema_migrations ORDER BY 1")
    assert [r["version"] for r in rows] == list(range(1, REQUIRED_VERSION + 1))
    assert not any(r["contract"] for r in rows)  # none of ours removes anything (yet)
    assert Migration(9, "drop_x", f"{CONTRACT_MARK}\nALTER TABLE t DROP COLUMN x;").contract


def test_migrate_with_nothing_to_apply_issues_no_ddl(pg_admin_dsn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A deploy runs migrate every time, possibly while a pg_dump holds every table: with
    nothing to apply it succeeded yesterday, and must not now fail adding the contract
    column behind the dump's lock (a LockNotAvailableError after 2 s, exit 3)."""
    import asyncio

    import asyncpg

    dsn = create_database(pg_admin_dsn)
    sql_sync(dsn, "ALTER TABLE schema_migrations DROP COLUMN contract")  # yesterday's table

    async def during_a_dump() -> subprocess.CompletedProcess[str]:
        dump = await asyncpg.connect(dsn)
        try:
            async with dump.transaction():
                await dump.execute("LOCK TABLE schema_migrations IN ACCESS SHARE MODE")
                return await asyncio.to_thread(
                    subprocess.run,
                    [str(VENV_BIN / "ocsp-responder"), "migrate", "--database-url", dsn],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    cwd=tmp_path,
                )
        finally:
            await dump.close()

    result = run_async(during_a_dump())
    assert result.returncode == 0, result.stderr
    assert result.stdout == "schema is up to date\n"
