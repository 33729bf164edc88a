"""Schema: versioned migrations under an advisory lock; serve never needs DDL."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from responder.schema import REQUIRED_VERSION, migrate
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
