"""Signing keys inside a PKCS#11 token (SoftHSM2): configuration, start-up checks, serving.

The responder key and an issuer key are imported into a throwaway SoftHSM2 token and their
PEM files deleted; the responder then serves GET/POST good, revoked, SHA-256 CertIDs and
nonce echoes, every answer checked by cryptography and `openssl ocsp`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from responder.config import ConfigError, load_config
from responder.protocol import parse_request
from responder.service import ResponderService
from signer.demo_ca import create_ca
from signer.keys import KeyLoadError, write_pem_key
from signer.pkcs11_key import Pkcs11Key, parse_pkcs11_uri, spec_from_table
from tests.softhsm import SoftHSMToken, softhsm_module
from tests.support import (
    VENV_BIN,
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    issuer_files,
    write_config,
)

if softhsm_module() is None and os.environ.get("CI"):
    raise RuntimeError("SoftHSM2 missing in CI: .ci/run installs package softhsm2")
pytestmark = pytest.mark.skipif(
    softhsm_module() is None, reason="SoftHSM2 missing: apt-get install softhsm2"
)


def test_uri_and_table_forms(tmp_path: Path) -> None:
    spec = parse_pkcs11_uri(
        "pkcs11:token=My%20HSM;object=r1-ocsp?module-path=/usr/lib/x.so&pin-source=file:pin",
        tmp_path,
    )
    assert (spec.module, spec.token, spec.label) == (Path("/usr/lib/x.so"), "My HSM", "r1-ocsp")
    assert spec.pin_file == tmp_path / "pin" and spec.pin_env is None
    spec = parse_pkcs11_uri("pkcs11:token=t;object=k?module-path=m.so&pin-env=HSM_PIN", tmp_path)
    assert spec.pin_env == "HSM_PIN" and spec.module == tmp_path / "m.so"
    table = spec_from_table(
        {"pkcs11_module": "/m.so", "token": "t", "label": "k", "pin_env": "P"}, tmp_path, "k"
    )
    assert table.label == "k" and table.pin_env == "P"
    for bad, message in (
        ("pkcs11:token=t;object=k?module-path=m.so&pin-value=1234", "pin-value is refused"),
        ("pkcs11:token=t;object=k?pin-env=P", "module-path"),
        ("pkcs11:token=t?module-path=m.so&pin-env=P", "object"),
        ("pkcs11:token=t;object=k?module-path=m.so", "exactly one of pin_file"),
        ("pkcs11:token=t;object=k?module-path=m&pin-source=https://x", "file: URI"),
    ):
        with pytest.raises(KeyLoadError, match=message):
            parse_pkcs11_uri(bad, tmp_path)
    with pytest.raises(KeyLoadError, match="unknown keys pin"):
        spec_from_table(
            {"pkcs11_module": "m", "token": "t", "label": "k", "pin": "1"}, tmp_path, "k"
        )


def test_config_accepts_token_keys(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        "[[issuers]]\nname = 'a'\ncertificate = 'a.pem'\n"
        "responder_certificate = 'r.pem'\n"
        "responder_key = 'pkcs11:token=t;object=r?module-path=/m.so&pin-env=PIN'\n"
        "[[issuers]]\nname = 'b'\ncertificate = 'b.pem'\n"
        "key = { pkcs11_module = '/m.so', token = 't', label = 'b', pin_file = 'pin' }\n"
    )
    cfg = load_config(tmp_path / "c.toml", {})
    assert cfg.issuers[0].responders[0].key.label == "r"  # type: ignore[union-attr]
    assert cfg.issuers[1].key.pin_file == tmp_path / "pin"  # type: ignore[union-attr]
    (tmp_path / "c.toml").write_text(
        "[[issuers]]\nname = 'a'\ncertificate = 'a.pem'\n"
        "key = { pkcs11_module = '/m.so', token = 't', label = 'b', pin = '1234' }\n"
    )
    with pytest.raises(ConfigError, match=r"issuers\[0\].key: .*unknown keys pin"):
        load_config(tmp_path / "c.toml", {})


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMToken:
    return SoftHSMToken.create(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="module")
def hsm_p256(token: SoftHSMToken, workdir: Path) -> IssuerFiles:
    """A delegated P-256 responder whose key lives only in the token."""
    files = issuer_files("hsm-p256", create_ca("p256", "HSM P256"), workdir / "hsm")
    token.import_key(files.directory / "responder.key", "p256-ocsp", "01")
    (files.directory / "responder.key").unlink()
    return files


@pytest.fixture(scope="module")
def hsm_rsa(token: SoftHSMToken, workdir: Path) -> IssuerFiles:
    """An RSA issuer signing its own responses with its key in the token."""
    files = issuer_files(
        "hsm-rsa", create_ca("rsa2048", "HSM RSA"), workdir / "hsm", delegated=False
    )
    token.import_key(files.directory / "issuing-ca.key", "rsa-ca", "02")
    (files.directory / "issuing-ca.key").unlink()
    return files


def hsm_tables(token: SoftHSMToken, p256: IssuerFiles, rsa: IssuerFiles) -> str:
    return (
        f'[[issuers]]\nname = "{p256.name}"\ncertificate = "{p256.ca_pem}"\n'
        f'responder_certificate = "{p256.directory / "responder.pem"}"\n'
        f'responder_key = "{token.uri("p256-ocsp")}"\n'
        f'[[issuers]]\nname = "{rsa.name}"\ncertificate = "{rsa.ca_pem}"\n'
        f"key = {token.table('rsa-ca')}\n"
    )


def hsm_process(directory: Path, dsn: str, token: SoftHSMToken, tables: str) -> ResponderProcess:
    proc = write_config(directory, dsn, [], extra="")
    proc.config_path.write_text(proc.config_path.read_text() + tables)
    proc.env.update(token.env)
    return proc


@pytest.fixture(scope="module")
def hsm_responder(
    module_database: str,
    token: SoftHSMToken,
    hsm_p256: IssuerFiles,
    hsm_rsa: IssuerFiles,
    workdir: Path,
) -> Iterator[ResponderProcess]:
    proc = hsm_process(
        workdir / "hsm-serve", module_database, token, hsm_tables(token, hsm_p256, hsm_rsa)
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def post(url: str, der: bytes) -> httpx.Response:
    return httpx.post(url, content=der, headers={"Content-Type": "application/ocsp-request"})


def test_token_keys_serve_good_revoked_sha256_nonce(hsm_responder, hsm_p256):  # type: ignore[no-untyped-def]
    cert = hsm_p256.ca.issue_leaf("hsm-good.test")
    assert hsm_responder.record(cert).status_code == 201  # recording signs with the token
    der = build_request(cert, hsm_p256.ca.ca_cert)
    for resp in (httpx.get(get_url(hsm_responder.url, der)), post(hsm_responder.url + "/", der)):
        assert resp.status_code == 200
        check_response(resp.content, issuer=hsm_p256, serial=cert.serial_number)
    # SHA-256 CertID: signed on demand by the token
    der = build_request(cert, hsm_p256.ca.ca_cert, alg="sha256")
    check_response(
        httpx.get(get_url(hsm_responder.url, der)).content,
        issuer=hsm_p256,
        serial=cert.serial_number,
        alg="sha256",
    )
    # nonce echo (live path, SHA-512 CertID not cached)
    nonce = secrets.token_bytes(32)
    der = build_request(cert, hsm_p256.ca.ca_cert, alg="sha512", nonce=nonce)
    check_response(
        post(hsm_responder.url + "/", der).content,
        issuer=hsm_p256,
        serial=cert.serial_number,
        alg="sha512",
        nonce=nonce,
    )
    # revoked: the revocation's response is signed by the token too
    revoked = hsm_p256.ca.issue_leaf("hsm-revoked.test")
    assert hsm_responder.record(revoked).status_code == 201
    assert hsm_responder.revoke(hsm_p256.name, revoked.serial_number).status_code == 201
    der = build_request(revoked, hsm_p256.ca.ca_cert)
    checked = check_response(
        httpx.get(get_url(hsm_responder.url, der)).content,
        issuer=hsm_p256,
        serial=revoked.serial_number,
        expect="revoked",
    )
    assert "Reason: keyCompromise" in checked.openssl_text


def test_token_rsa_issuer_signing_itself(hsm_responder, hsm_rsa):  # type: ignore[no-untyped-def]
    cert = hsm_rsa.ca.issue_leaf("hsm-rsa.test")
    assert hsm_responder.record(cert).status_code == 201
    for alg in ("sha1", "sha256"):
        der = build_request(cert, hsm_rsa.ca.ca_cert, alg=alg)
        check_response(
            httpx.get(get_url(hsm_responder.url, der)).content,
            issuer=hsm_rsa,
            serial=cert.serial_number,
            alg=alg,
        )


def serve_fails(config: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_wrong_pin_and_wrong_key_refused_at_start(  # type: ignore[no-untyped-def]
    module_database, token, hsm_p256, hsm_rsa, workdir
):
    # a key in the token that does not belong to the responder certificate
    other = create_ca("p256", "Other")
    other_key = workdir / "other.key"
    write_pem_key(other_key, other.responder_key)
    token.import_key(other_key, "not-the-responder", "03")
    tables = hsm_tables(token, hsm_p256, hsm_rsa).replace("p256-ocsp", "not-the-responder")
    proc = hsm_process(workdir / "hsm-wrong", module_database, token, tables)
    err = serve_fails(proc.config_path, token.env)
    assert "issuer hsm-p256: signing self-test failed" in err
    # a wrong PIN: the token refuses the login, serve names the token and key
    bad_pin = workdir / "bad-pin"
    bad_pin.write_text("00000000\n")
    bad_pin.chmod(0o600)
    tables = hsm_tables(token, hsm_p256, hsm_rsa).replace(str(token.pin_file), str(bad_pin))
    proc = hsm_process(workdir / "hsm-pin", module_database, token, tables)
    err = serve_fails(proc.config_path, token.env)
    assert "pkcs11 token 'ocsp-test' key 'p256-ocsp': PinIncorrect" in err
    assert "00000000" not in err
    # a PIN file others can read is refused like a key file
    bad_pin.chmod(0o644)
    err = serve_fails(proc.config_path, token.env)
    assert "must not be readable by group or others" in err


def test_lost_session_is_reopened(token, hsm_p256, hsm_rsa, monkeypatch):  # type: ignore[no-untyped-def]
    """A token restart or dropped HSM connection invalidates the session: the next
    signature logs in again instead of failing until the process restarts."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    from signer.pkcs11_key import Pkcs11Key

    for name, value in token.env.items():
        monkeypatch.setenv(name, value)
    ec_key = Pkcs11Key(parse_pkcs11_uri(token.uri("p256-ocsp"), token.directory))
    rsa_key = Pkcs11Key(parse_pkcs11_uri(token.uri("rsa-ca"), token.directory))
    assert ec_key._session is rsa_key._session  # one login per token
    old = ec_key._session
    old.close()  # the session disappears under both keys
    for _ in range(2):
        sig = ec_key.sign(b"probe", hashes.SHA256())
        hsm_p256.ca.responder_cert.public_key().verify(sig, b"probe", ec.ECDSA(hashes.SHA256()))
        sig = rsa_key.sign(b"probe", hashes.SHA256())
        hsm_rsa.ca.ca_cert.public_key().verify(sig, b"probe", padding.PKCS1v15(), hashes.SHA256())
    assert ec_key._session is rsa_key._session
    assert ec_key._session is not old  # a new session was opened


def test_token_signatures_run_off_the_event_loop(  # type: ignore[no-untyped-def]
    token, hsm_p256, hsm_rsa, module_database, workdir, monkeypatch
):
    """A token signature is a PKCS#11 round trip (milliseconds on a network HSM): made in
    the event loop, every answer from memory of that worker waited for it. Recording,
    on-demand signing (with a nonce echo) and revocation sign in a thread for a token key;
    the answers are the same, checked by cryptography and `openssl ocsp`."""
    for name, value in token.env.items():
        monkeypatch.setenv(name, value)
    proc = hsm_process(
        workdir / "hsm-in-process", module_database, token, hsm_tables(token, hsm_p256, hsm_rsa)
    )
    config = load_config(proc.config_path, {})
    threads: list[int] = []
    real_sign = Pkcs11Key.sign

    def sign(self: Pkcs11Key, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        threads.append(threading.get_ident())  # the real token signs; we note where
        return real_sign(self, data, algorithm)

    monkeypatch.setattr(Pkcs11Key, "sign", sign)
    cert = hsm_p256.ca.issue_leaf("off-loop.test")
    nonce = secrets.token_bytes(16)

    async def go() -> tuple[int, bytes, bytes]:
        service = ResponderService(config)
        await service.start(pool_size=2, monitor=False)
        try:
            threads.clear()  # the start-up check of each key is not on the serving path
            issuer = next(i for i in service.registry.issuers if i.name == hsm_p256.name)
            assert issuer.token_signed
            await service.recorder.record([cert])
            recorded = len(threads)
            der = build_request(cert, hsm_p256.ca.ca_cert, alg="sha256", nonce=nonce)
            answer = await service.chain.response(parse_request(der))
            await service.revoker.revoke(issuer, cert.serial_number, x509.ReasonFlags.superseded)
            der = build_request(cert, hsm_p256.ca.ca_cert, alg="sha384")
            revoked = await service.chain.response(parse_request(der))
            assert recorded >= 1 and len(threads) >= recorded + 3
            return threading.get_ident(), answer.response.der, revoked.response.der
        finally:
            await service.close()

    loop_thread, live, revoked = asyncio.run(go())
    assert threads and loop_thread not in threads
    check_response(live, issuer=hsm_p256, serial=cert.serial_number, alg="sha256", nonce=nonce)
    check_response(
        revoked, issuer=hsm_p256, serial=cert.serial_number, alg="sha384", expect="revoked"
    )


def test_token_p521_key_signs_with_sha512(token, workdir, monkeypatch):  # type: ignore[no-untyped-def]
    """BR 7.1.3.2.2: a P-521 key signs with ecdsa-with-SHA512 (it used SHA-384, like
    P-384), in a token as in a PEM file (tests/test_interop_lint.py serves a PEM one)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from signer.issuers import signature_hash_for

    for name, value in token.env.items():
        monkeypatch.setenv(name, value)
    files = issuer_files("hsm-p521", create_ca("p521", "HSM P521"), workdir / "hsm")
    token.import_key(files.directory / "responder.key", "p521-ocsp", "21")
    key = Pkcs11Key(parse_pkcs11_uri(token.uri("p521-ocsp"), token.directory))
    algorithm = signature_hash_for(key)
    assert isinstance(algorithm, hashes.SHA512)
    signature = key.sign(b"probe", algorithm)
    public = files.ca.responder_cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"probe", ec.ECDSA(hashes.SHA512()))


def test_token_signed_answers_pass_pkilint_gnutls_and_go(  # type: ignore[no-untyped-def]
    hsm_responder, hsm_p256, hsm_rsa, tmp_path_factory
):
    """A token signature goes through hand-edited DER (signer/external_signature.py: the
    stand-in's responderID and signature replaced): its answers (pre-signed, on demand
    with a nonce, revoked) must pass the same judges as file-key ones
    (tests/test_interop_lint.py)."""
    from tests.interop_clients import build_go_checker, gnutls_verify, go_parse, lint_ocsp_response

    go = build_go_checker(tmp_path_factory.mktemp("go"))
    for files in (hsm_p256, hsm_rsa):
        cert = files.ca.issue_leaf("hsm-judged.test")
        assert hsm_responder.record(cert).status_code == 201
        nonce = secrets.token_bytes(16)
        good = httpx.get(get_url(hsm_responder.url, build_request(cert, files.ca.ca_cert)))
        live = post(
            hsm_responder.url + "/",
            build_request(cert, files.ca.ca_cert, alg="sha256", nonce=nonce),
        )
        assert hsm_responder.revoke(files.name, cert.serial_number).status_code == 201
        revoked = httpx.get(get_url(hsm_responder.url, build_request(cert, files.ca.ca_cert)))
        for reply, status, sent in (
            (good, "good", None),
            (live, "good", nonce),
            (revoked, "revoked", None),
        ):
            der = reply.content
            assert lint_ocsp_response(der) == [], (files.name, status)
            view = gnutls_verify(der, files.ca_pem, delegated=files.delegated)
            assert view.verified, view.output
            assert (view.cert_status, view.serial, view.nonce) == (status, cert.serial_number, sent)
            parsed = go_parse(go, der, files.ca_pem)
            assert parsed.accepted and parsed.fields["status"] == status, parsed.output
