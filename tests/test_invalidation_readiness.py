"""Readiness follows the invalidation listener: an instance that cannot hear revocations
made through other instances must not report ready while it serves from its cache.

The listener's session is terminated while its role may open no new connection (the
pool's connections stay): the database answers, only the LISTEN is gone. Real `serve`,
real PostgreSQL.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx

from responder.invalidation import APPLICATION_NAME
from tests.support import IssuerFiles, create_database, sql_sync, write_config


def wait_for(proc_url: str, status: int, timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.get(proc_url + "/readyz", timeout=10)
        if resp.status_code == status or time.monotonic() > deadline:
            return resp
        time.sleep(0.2)


def test_readiness_needs_the_invalidation_listener(
    pg_admin_dsn: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    dsn = create_database(pg_admin_dsn)
    role = "ocsp_listen_" + secrets.token_hex(4)
    sql_sync(dsn, f"CREATE ROLE {role} LOGIN")
    sql_sync(dsn, f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}")
    sql_sync(dsn, f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    base, _, dbname = dsn.rpartition("/")
    role_dsn = f"postgresql://{role}@{base.split('@', 1)[1]}/{dbname}"
    proc = write_config(tmp_path, role_dsn, [p256_issuer]).start()
    try:
        assert wait_for(proc.url, 200).status_code == 200
        checks = httpx.get(proc.admin_url + "/readyz", timeout=10).json()["checks"]
        assert checks["invalidation"] == {"ok": True, "detail": "listening"}
        sql_sync(dsn, f"ALTER ROLE {role} CONNECTION LIMIT 0")  # open sessions stay
        try:
            (killed,) = sql_sync(
                dsn,
                "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
                "WHERE usename = $1 AND application_name = $2",
                role,
                APPLICATION_NAME,
            )
            assert killed["done"]
            resp = wait_for(proc.url, 503)
            # was 200 "ready": the database answers, the cache no longer hears revocations
            assert resp.status_code == 503, resp.text
            assert "invalidation: listener not connected" in resp.text
            assert "database" not in resp.text  # the pool still works
        finally:
            sql_sync(dsn, f"ALTER ROLE {role} CONNECTION LIMIT -1")
        # it reconnects by itself (and clears its cache): ready again
        assert wait_for(proc.url, 200).status_code == 200
        assert "invalidation: listener reconnected; cache cleared" in proc.log()
    finally:
        proc.stop()
