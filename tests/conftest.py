"""Test fixtures: a real PostgreSQL (throwaway, or $DATABASE_URL) and real responders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from signer.demo_ca import DemoCA, create_ca
from tests.pgcluster import PgCluster
from tests.support import IssuerFiles, ResponderProcess, create_database, issuer_files, write_config


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """A superuser DSN: $DATABASE_URL when set, else a cluster started for this session."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    cluster = PgCluster().init().start()
    try:
        yield cluster.dsn()
    finally:
        cluster.destroy()


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL of this test's own, which it may stop, pause or restart (the shared
    cluster of ``pg_admin_dsn`` must stay up for every other test)."""
    cluster = PgCluster().init().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def database(pg_admin_dsn: str) -> str:
    """A fresh, migrated database for one test."""
    return create_database(pg_admin_dsn)


@pytest.fixture(scope="module")
def module_database(pg_admin_dsn: str) -> str:
    return create_database(pg_admin_dsn)


@pytest.fixture(scope="session")
def demo_ca() -> DemoCA:
    return create_ca("p256", "Test P256")


@pytest.fixture(scope="session")
def rsa_ca() -> DemoCA:
    return create_ca("rsa2048", "Test RSA")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def p256_issuer(demo_ca: DemoCA, workdir: Path) -> IssuerFiles:
    return issuer_files("p256", demo_ca, workdir, delegated=True)


@pytest.fixture(scope="module")
def rsa_issuer(rsa_ca: DemoCA, workdir: Path) -> IssuerFiles:
    """An issuer that signs its own responses (no delegated responder)."""
    return issuer_files("rsa", rsa_ca, workdir, delegated=False)


@pytest.fixture(scope="module")
def responder(
    module_database: str, p256_issuer: IssuerFiles, rsa_issuer: IssuerFiles, workdir: Path
) -> Iterator[ResponderProcess]:
    """One `ocsp-responder serve` for a test module, with a P-256 and an RSA issuer."""
    proc = write_config(workdir, module_database, [p256_issuer, rsa_issuer]).start()
    try:
        yield proc
    finally:
        proc.stop()
