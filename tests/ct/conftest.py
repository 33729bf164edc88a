"""Fixtures: a real uvicorn CT log on loopback, reusable by integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from signer.demo_ca import DemoCA, create_ca
from tests.support import IssuerFiles, issuer_files

from .fakelog import FakeLog, FakeLogServer
from .pki import Pki, make_pki


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeLogServer]:
    """One server for the session; tests install their own FakeLog on it."""
    with FakeLogServer() as srv:
        yield srv


@pytest.fixture
def fake_log(fake_server: FakeLogServer) -> FakeLog:
    """A fresh, empty FakeLog served by ``fake_server`` (``fake_server.url``)."""
    fake_server.log = FakeLog()
    return fake_server.log


@pytest.fixture(scope="session")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="session")
def ct_ca() -> DemoCA:
    """Our CA for the CT index tests: root, issuing CA, delegated responder."""
    return create_ca("p256", "CT Test")


@pytest.fixture(scope="session")
def ct_issuer(ct_ca: DemoCA, tmp_path_factory: pytest.TempPathFactory) -> IssuerFiles:
    """``ct_ca`` as configuration files (issuer ``ctca``)."""
    return issuer_files("ctca", ct_ca, tmp_path_factory.mktemp("ctca"))


@pytest.fixture
def fixture_log(fake_log: FakeLog) -> FakeLog:
    """The real Static CT fixture tiles (1,024 precert entries), published."""
    fake_log.add_fixture_tiles()
    fake_log.publish()
    return fake_log
