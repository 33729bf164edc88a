"""Shared pieces of the CT index tests: issuers, test-twin CAs, logs, waiting."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from responder.ct import RetryPolicy
from responder.store import PresignedStore
from signer.demo_ca import (
    DemoCA,
    create_ca,
    make_issuing_ca_certificate,
    make_responder_certificate,
    new_key,
)
from signer.issuers import Issuer, IssuerRegistry, issuer_from_certificate, make_responder

from .fakelog import ISSUERS, FakeLog, FakeLogServer, Twin
from .pki import CA, make_ca

DER = serialization.Encoding.DER
STAGING_FILES = {"e5": "e5-cross.pem", "e6": "e6-cross.pem", "r10": "r10.pem", "r11": "r11.pem"}
STAGING_KINDS = {"e5": "p384", "e6": "p384", "r10": "rsa2048", "r11": "rsa2048"}
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, timeout=10)


def staging_certs() -> dict[str, x509.Certificate]:
    """The real Let's Encrypt staging intermediates the fixture entries chain to."""
    return {
        n: x509.load_pem_x509_certificate((ISSUERS / f).read_bytes())
        for n, f in STAGING_FILES.items()
    }


def spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def twin_ca(real: x509.Certificate, kind: str) -> DemoCA:
    """A test CA with the real issuer's exact subject Name but our own key, under a test
    root, with a BR delegated responder: it can sign for serials the real issuer logged."""
    base = create_ca(kind, f"Twin {real.subject.rfc4514_string()[:20]}")
    key = new_key(kind)
    ca = make_issuing_ca_certificate(base.root_cert, base.root_key, key, real.subject)
    responder_key = new_key(kind)
    responder = make_responder_certificate(ca, key, responder_key, name="Twin")
    return DemoCA(base.root_cert, base.root_key, ca, key, responder, responder_key)


def precert_signing_ca(ca: DemoCA) -> CA:
    """A precertificate signing CA (EKU 1.3.6.1.4.1.11129.2.4.4) under ``ca``."""
    return make_ca("Precert Signing", CA(ca.ca_cert, ca.ca_key), precert_signing=True)  # type: ignore[arg-type]


def precert_and_tbs(
    ca: DemoCA,
    name: str,
    serial: int,
    signer: CA | None = None,
    *,
    logged_serial: int | None = None,
    logged_lifetime: dt.timedelta | None = None,
) -> tuple[bytes, bytes]:
    """A precertificate (DER) of ``ca`` (or of its signing CA ``signer``) and the
    TBSCertificate a log carries for it, issued at one instant so that their notAfters
    agree (two calls a second boundary apart would not). ``logged_serial``: a TBS with
    another serial (or ``logged_lifetime``, another notAfter), for a log that pairs a
    precertificate with a TBSCertificate that is not its own."""
    at = dt.datetime.now(dt.UTC)
    kw = {"issuer_cert": signer.cert, "issuer_key": signer.key} if signer else {}
    pre = ca.issue_leaf(name, serial=serial, precertificate=True, issued_at=at, **kw)  # type: ignore[arg-type]
    life = {"lifetime": logged_lifetime} if logged_lifetime is not None else {}
    tbs = ca.issue_leaf(
        name, serial=logged_serial or serial, issued_at=at, **life
    ).tbs_certificate_bytes
    return pre.public_bytes(DER), tbs


def bare_registry(certs: dict[str, x509.Certificate]) -> IssuerRegistry:
    """Issuers known by certificate only: they can be indexed, not signed for."""
    return IssuerRegistry([issuer_from_certificate(n, c) for n, c in certs.items()])


def signing_registry(cas: dict[str, DemoCA]) -> IssuerRegistry:
    """Issuers with their delegated responders, as the configuration would load them."""
    issuers: list[Issuer] = []
    for name, ca in cas.items():
        issuer = issuer_from_certificate(name, ca.ca_cert)
        issuer.responders.append(
            make_responder(issuer, ca.responder_cert, ca.responder_key, delegated=True)
        )
        issuers.append(issuer)
    return IssuerRegistry(issuers)


async def connect(dsn: str, registry: IssuerRegistry) -> PresignedStore:
    store = await PresignedStore.connect(dsn, min_size=1, max_size=4)
    await store.register_issuers(registry.issuers)
    return store


def ct_log_table(srv: FakeLogServer, kind: str, *, name: str, poll: float = 0.25) -> str:
    return (
        "[[ct_logs]]\n"
        f'name = "{name}"\n'
        f'url = "{srv.url}"\n'
        f'kind = "{kind}"\n'
        f'origin = "{srv.log.origin}"\n'
        f'public_key = """{srv.log.public_key_pem.decode()}"""\n'
        f"poll_interval = {poll}\n"
        "batch_size = 256\n"
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def fixture_log(rekey: dict[bytes, Twin] | None = None) -> FakeLog:
    log = FakeLog()
    log.add_fixture_tiles(rekey=rekey)
    log.publish()
    return log


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 20, what: str = "condition"
) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
