"""Shared test machinery: databases, responder processes, OCSP requests and checks.

Everything here is real: a PostgreSQL server, `ocsp-responder serve` as a subprocess on
loopback, and responses checked by cryptography and by `openssl ocsp` independently.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp

from responder.schema import migrate
from signer.demo_ca import DemoCA, write_ca, write_pem_cert

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HASHES = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def run_async(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def create_database(admin_dsn: str, *, migrated: bool = True) -> str:
    """A fresh database on the test server, migrated unless asked otherwise."""
    name = "t_" + secrets.token_hex(6)

    async def go() -> str:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        base, _, _ = admin_dsn.rpartition("/")
        dsn = f"{base}/{name}"
        if migrated:
            await migrate(dsn)
        return dsn

    return run_async(go())


async def sql(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def sql_sync(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    return run_async(sql(dsn, query, *args))


@dataclass
class IssuerFiles:
    name: str
    ca: DemoCA
    directory: Path
    delegated: bool = True

    @property
    def ca_pem(self) -> Path:
        return self.directory / "issuing-ca.pem"

    @property
    def root_pem(self) -> Path:
        return self.directory / "root.pem"

    @property
    def chain_pem(self) -> Path:
        return self.directory / "chain.pem"

    def config_table(self) -> str:
        lines = ["[[issuers]]", f'name = "{self.name}"', f'certificate = "{self.ca_pem}"']
        if self.delegated:
            lines += [
                f'responder_certificate = "{self.directory / "responder.pem"}"',
                f'responder_key = "{self.directory / "responder.key"}"',
            ]
        else:
            lines.append(f'key = "{self.directory / "issuing-ca.key"}"')
        return "\n".join(lines) + "\n"


def issuer_files(name: str, ca: DemoCA, base: Path, *, delegated: bool = True) -> IssuerFiles:
    directory = base / name
    write_ca(ca, directory)
    write_pem_cert(directory / "chain.pem", ca.ca_cert, ca.root_cert)
    return IssuerFiles(name, ca, directory, delegated)


def run_cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``ocsp-responder ARGS --config CONFIG``, output captured as text (the tests assert
    on its exit status, stdout and stderr)."""
    return subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class ResponderProcess:
    """`ocsp-responder serve` in a subprocess, on free loopback ports."""

    config_path: Path
    port: int
    admin_port: int
    token: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 30) -> ResponderProcess:
        self.log_path = self.config_path.with_suffix(f".{self.port}.log")
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"responder exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"responder did not start:\n{self.log()}")

    def ready(self, timeout: float = 10) -> httpx.Response:
        """/readyz once it says ready, or its last answer after ``timeout``: ``start``
        returns at /healthz, while the warm-up or the first LISTEN may still be under way
        (not ready for a few milliseconds), so asking /readyz once right after start
        raced with them. A test asserts on the returned answer."""
        deadline = time.monotonic() + timeout
        while True:
            resp = httpx.get(self.url + "/readyz", timeout=10)
            if resp.status_code == 200 or time.monotonic() > deadline:
                return resp
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def record(self, cert: x509.Certificate, *, der: bool = False) -> httpx.Response:
        body = cert.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
        return httpx.post(
            self.admin_url + "/v1/certificates",
            content=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    def record_batch(self, body: bytes) -> httpx.Response:
        """POST /v1/certificates:batch with a PEM bundle or concatenated DER."""
        return httpx.post(
            self.admin_url + "/v1/certificates:batch",
            content=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
        )

    def revoke(
        self, issuer: str, serial: int, reason: str = "keyCompromise", **extra: object
    ) -> httpx.Response:
        return httpx.post(
            self.admin_url + "/v1/revocations",
            json={"issuer": issuer, "serial": format(serial, "x"), "reason": reason, **extra},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )


def free_port() -> int:
    from tests.pgcluster import free_port as fp

    return fp()


def write_config(
    directory: Path,
    dsn: str,
    issuers: list[IssuerFiles],
    *,
    extra: str = "",
    port: int | None = None,
    admin_port: int | None = None,
) -> ResponderProcess:
    token = secrets.token_urlsafe(24)
    port = port or free_port()
    admin_port = free_port() if admin_port is None else admin_port
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / f"token-{port}"
    token_file.write_text(token)
    config = directory / f"responder-{port}.toml"
    config.write_text(
        f'database_url = "{dsn}"\n'
        f'data_dir = "{directory}"\n'
        f'listen = "127.0.0.1:{port}"\n'
        f'admin_listen = "127.0.0.1:{admin_port}"\n'
        f'admin_token_file = "{token_file}"\n'
        f"{extra}\n" + "".join(i.config_table() for i in issuers)
    )
    return ResponderProcess(config, port, admin_port, token)


# --- OCSP requests and independent checks -------------------------------------------------


def build_request(
    cert: x509.Certificate | None,
    issuer: x509.Certificate,
    *,
    alg: str = "sha1",
    serial: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder()
    if cert is not None and serial is None:
        builder = builder.add_certificate(cert, issuer, HASHES[alg]())
    else:
        from signer.issuers import issuer_from_certificate

        info = issuer_from_certificate("x", issuer)
        name_hash, key_hash = info.cert_id_hashes[alg]
        assert serial is not None
        builder = builder.add_certificate_by_hash(name_hash, key_hash, serial, HASHES[alg]())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def duplicated_nonce_request(issuer: x509.Certificate, serial: int) -> bytes:
    """A request whose requestExtensions hold the nonce extension twice (RFC 5280 4.2
    forbids it; cryptography's builder refuses to make one, so the second extension is
    made under a neighbouring OID of the same length and its last byte rewritten)."""
    nonce_oid = x509.ObjectIdentifier("1.3.6.1.5.5.7.48.1.2")
    twin_oid = x509.ObjectIdentifier("1.3.6.1.5.5.7.48.1.3")
    value = b"\x04\x10" + b"n" * 16  # extnValue: OCTET STRING (the nonce)
    from signer.issuers import issuer_from_certificate

    name_hash, key_hash = issuer_from_certificate("x", issuer).cert_id_hashes["sha1"]
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
        .add_extension(x509.UnrecognizedExtension(nonce_oid, value), critical=False)
        .add_extension(x509.UnrecognizedExtension(twin_oid, value), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    twin = b"\x06\x09" + bytes.fromhex("2b0601050507300103")
    assert der.count(twin) == 1
    return der.replace(twin, twin[:-1] + b"\x02")


def critical_extension_request(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    extension: x509.ExtensionType,
    *,
    critical: bool = True,
) -> bytes:
    """A SHA-1 request for ``cert`` with one requestExtension, critical by default."""
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, issuer, hashes.SHA1())
        .add_extension(extension, critical=critical)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def with_single_request_extension(request: bytes, *, critical: bool, times: int = 1) -> bytes:
    """``request`` (one CertID, as build_request makes it) with a singleRequestExtension
    (OID 1.2.3.4, value NULL; ``times`` copies of it) in its Request; cryptography's
    builder cannot make one."""
    from signer.der import children, encode_tlv, expect

    c0, c1 = expect(request, 0, len(request), 0x30)
    t0, t1 = expect(request, c0, c1, 0x30)
    parts = children(request, t0, t1)
    [(_, list_start, l0, l1)] = [p for p in parts if p[0] == 0x30]
    [(_, _, r0, r1)] = children(request, l0, l1)
    extension = encode_tlv(
        0x30,
        encode_tlv(0x06, bytes.fromhex("2a0304"))
        + (b"\x01\x01\xff" if critical else b"")
        + encode_tlv(0x04, b"\x05\x00"),
    )
    single = encode_tlv(0xA0, encode_tlv(0x30, extension * times))
    new_list = encode_tlv(0x30, encode_tlv(0x30, request[r0:r1] + single))
    tbs = request[t0:list_start] + new_list + request[l1:t1]
    return encode_tlv(0x30, encode_tlv(0x30, tbs) + request[t1:c1])


def cert_id_request(
    alg_oid: str,
    name_hash: bytes,
    key_hash: bytes,
    serial: int,
    *,
    null_params: bool = True,
    serial_content: bytes | None = None,
) -> bytes:
    """A one-CertID DER OCSPRequest from raw parts: cryptography's builder refuses hashes
    of the wrong length, always writes the NULL parameters and the minimal serial
    (``serial_content``: the INTEGER's content octets as given)."""
    from signer.der import encode_tlv

    algorithm = encode_tlv(
        0x30,
        encode_tlv(0x06, _oid(alg_oid)) + (b"\x05\x00" if null_params else b""),
    )
    content = (
        serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True)
        if serial_content is None
        else serial_content
    )
    cert_id = encode_tlv(
        0x30,
        algorithm
        + encode_tlv(0x04, name_hash)
        + encode_tlv(0x04, key_hash)
        + encode_tlv(0x02, content),
    )
    return encode_tlv(0x30, encode_tlv(0x30, encode_tlv(0x30, encode_tlv(0x30, cert_id))))


def _oid(dotted: str) -> bytes:
    """The DER content octets of an OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def get_url(base: str, der: bytes, *, prefix: str = "", style: str = "quoted") -> str:
    b64 = base64.b64encode(der).decode()
    if style == "quoted":
        path = quote(b64, safe="")
    elif style == "raw":
        path = b64
    elif style == "space":
        path = b64.replace("+", "%20")
    elif style == "urlsafe":  # RFC 4648 section 5, unpadded: needs no escaping
        path = base64.urlsafe_b64encode(der).decode().rstrip("=")
    else:
        raise ValueError(style)
    return f"{base}{prefix}/{path}"


@dataclass
class Checked:
    response: ocsp.OCSPResponse
    status: ocsp.OCSPCertStatus
    openssl_text: str


def check_response(
    der: bytes,
    *,
    issuer: IssuerFiles,
    serial: int,
    alg: str = "sha1",
    expect: str = "good",
    nonce: bytes | None = None,
    openssl: bool = True,
) -> Checked:
    """Independent checks of a successful response: cryptography and `openssl ocsp`
    (``openssl=False`` skips the subprocess, for bulk checks that sample it separately)."""
    resp = ocsp.load_der_ocsp_response(der)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    single = resp
    assert single.serial_number == serial
    assert single.hash_algorithm.name == alg
    from signer.issuers import issuer_from_certificate

    info = issuer_from_certificate("x", issuer.ca.ca_cert)
    assert (single.issuer_name_hash, single.issuer_key_hash) == info.cert_id_hashes[alg]
    this_update, next_update = single.this_update_utc, single.next_update_utc
    assert next_update is not None
    assert this_update.microsecond == 0 and next_update.microsecond == 0
    assert dt.timedelta(hours=8) <= next_update - this_update <= dt.timedelta(days=10)
    now = dt.datetime.now(dt.UTC)
    assert this_update <= now < next_update
    signer_cert = issuer.ca.responder_cert if issuer.delegated else issuer.ca.ca_cert
    assert next_update <= signer_cert.not_valid_after_utc
    # responderID byKey: SHA-1 of the signer's public key bits
    assert (
        resp.responder_key_hash
        == x509.SubjectKeyIdentifier.from_public_key(
            signer_cert.public_key()  # type: ignore[arg-type]
        ).digest
    )
    if issuer.delegated:
        assert [c.fingerprint(hashes.SHA256()) for c in resp.certificates] == [
            signer_cert.fingerprint(hashes.SHA256())
        ]
    _verify_signature(resp, signer_cert)
    status_name = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED}
    assert single.certificate_status == status_name[expect], single.certificate_status
    got_nonce = None
    for ext in resp.extensions:
        if isinstance(ext.value, x509.OCSPNonce):
            got_nonce = ext.value.nonce
    assert got_nonce == nonce
    text = openssl_verify(der, issuer) if openssl else ""
    return Checked(resp, single.certificate_status, text)


def _verify_signature(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> None:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        assert resp.signature_hash_algorithm is not None
        key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
    elif isinstance(key, rsa.RSAPublicKey):
        assert resp.signature_hash_algorithm is not None
        key.verify(
            resp.signature,
            resp.tbs_response_bytes,
            padding.PKCS1v15(),
            resp.signature_hash_algorithm,
        )
    else:
        raise AssertionError(f"unexpected key {type(key)}")


def openssl_verify(der: bytes, issuer: IssuerFiles) -> str:
    """`openssl ocsp -respin` must say 'Response verify OK' (signature and signer chain)."""
    with tempfile.NamedTemporaryFile(suffix=".der") as f:
        f.write(der)
        f.flush()
        cmd = [
            "openssl",
            "ocsp",
            "-respin",
            f.name,
            "-issuer",
            str(issuer.ca_pem),
            "-CAfile",
            str(issuer.chain_pem),
            "-resp_text",
        ]
        if not issuer.delegated:
            cmd += ["-VAfile", str(issuer.ca_pem)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert "Response verify OK" in output, output
    return output
