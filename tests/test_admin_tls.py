"""The admin listener over TLS with client certificates (mTLS), on real loopback sockets.

A client with a certificate from ``admin_client_ca`` (and the token) records; a client
without a certificate, or with one from another CA, never completes a request.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from responder.store import serial_key
from signer.keys import write_pem_key
from tests.support import IssuerFiles, ResponderProcess, sql_sync, write_config


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, *, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pair(
    directory: Path, stem: str, pair: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(pair[1].public_bytes(serialization.Encoding.PEM))
    write_pem_key(key_path, pair[0])
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_files(workdir: Path) -> dict[str, Path]:
    directory = workdir / "admin-tls"
    directory.mkdir()
    server_ca, client_ca, rogue_ca = (
        make_ca("Admin Server CA"),
        make_ca("Admin Client CA"),
        make_ca("Rogue CA"),
    )
    files: dict[str, Path] = {}
    for stem, ca in (("server-ca", server_ca), ("client-ca", client_ca)):
        files[stem] = directory / f"{stem}.pem"
        files[stem].write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    files["server"], files["server-key"] = write_pair(
        directory, "server", make_leaf(server_ca, "admin.test", server=True)
    )
    files["client"], files["client-key"] = write_pair(
        directory, "client", make_leaf(client_ca, "ca-issuance", server=False)
    )
    files["rogue"], files["rogue-key"] = write_pair(
        directory, "rogue", make_leaf(rogue_ca, "ca-issuance", server=False)
    )
    return files


@pytest.fixture(scope="module")
def tls_responder(
    module_database: str, p256_issuer: IssuerFiles, workdir: Path, tls_files: dict[str, Path]
) -> Iterator[ResponderProcess]:
    proc = write_config(
        workdir / "admin-tls-serve",
        module_database,
        [p256_issuer],
        extra=(
            f'admin_tls_cert = "{tls_files["server"]}"\n'
            f'admin_tls_key = "{tls_files["server-key"]}"\n'
            f'admin_client_ca = "{tls_files["client-ca"]}"\n'
        ),
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def client_context(tls_files: dict[str, Path], cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls_files["server-ca"]))
    if cert is not None:
        context.load_cert_chain(str(tls_files[cert]), str(tls_files[f"{cert}-key"]))
    return context


def test_mtls_client_certificate_required(  # type: ignore[no-untyped-def]
    tls_responder, tls_files, p256_issuer, module_database
):
    url = f"https://127.0.0.1:{tls_responder.admin_port}"
    cert = p256_issuer.ca.issue_leaf("mtls.test")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    token = {"Authorization": f"Bearer {tls_responder.token}"}
    # with a client certificate from the configured CA and the token: recorded
    with httpx.Client(verify=client_context(tls_files, "client")) as client:
        assert client.get(url + "/healthz").status_code == 200
        resp = client.post(url + "/v1/certificates", content=pem, headers=token)
        assert resp.status_code == 201, resp.text
        # TLS is not a substitute for the token
        assert client.post(url + "/v1/certificates", content=pem).status_code == 401
    # without a client certificate, or with one from another CA: the handshake is refused
    for cert_name in (None, "rogue"):
        other = p256_issuer.ca.issue_leaf("refused.test")
        with (
            httpx.Client(verify=client_context(tls_files, cert_name)) as client,
            pytest.raises(httpx.TransportError),
        ):
            client.post(
                url + "/v1/certificates",
                content=other.public_bytes(serialization.Encoding.PEM),
                headers=token,
            )
        assert not sql_sync(
            module_database,
            "SELECT 1 FROM certificates WHERE serial = $1",
            serial_key(other.serial_number),
        )
    # plain HTTP to the TLS listener gets nowhere either
    with pytest.raises(httpx.TransportError):
        httpx.post(
            f"http://127.0.0.1:{tls_responder.admin_port}/v1/certificates",
            content=pem,
            headers=token,
        ).raise_for_status()
