"""Our real responses, judged by relying parties other than cryptography and OpenSSL.

A running `ocsp-responder serve` with P-256, P-384, P-521 and RSA issuers, some signing
through a delegated responder certificate and some directly with the CA key, answers
good and revoked (every reason the admin API accepts), SHA-1/256/384/512 CertIDs, nonce
echoes, GET and POST, and the unsigned unauthorized/malformedRequest/tryLater answers.
Every answer must pass pkilint's OCSP response linter without a WARNING or worse, be
verified by GnuTLS `ocsptool` and parsed by Go's x/crypto/ocsp with the right status,
serial, CertID hash and reason. GnuTLS (`ocsptool --ask`) and Go also act as the whole
client: their own request, their own HTTP. The delegated responder certificates our code
makes must pass pkilint's BR 7.1.2.8 profile, and the loader must refuse the ones pkilint
calls misissued. docs/deploy.md ("Interoperability") lists the findings this found and
the ones we keep on purpose.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID
from pkilint.cabf.serverauth.serverauth_constants import CertificateType

from responder.protocol import MALFORMED_REQUEST, TRY_LATER, UNAUTHORIZED
from responder.store import serial_key
from signer.demo_ca import DemoCA, create_ca, random_serial, write_pem_cert
from signer.issuers import IssuerConfigError, check_delegated_responder, issuer_from_certificate
from signer.response_builder import ALLOWED_REASONS, REASON_CODES
from tests.interop_clients import (
    build_go_checker,
    gnutls_ask,
    gnutls_response_status,
    gnutls_verify,
    go_ask,
    go_parse,
    lint_certificate,
    lint_issued_by,
    lint_ocsp_response,
)
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    issuer_files,
    sql_sync,
    write_config,
)

#: reasons we revoke with on every issuer; the first issuer gets every allowed reason
SOME_REASONS = ("keyCompromise", "unspecified")
GNUTLS_HASH = {"sha1": "SHA1", "sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}
GO_HASH = {"sha1": "SHA-1", "sha256": "SHA-256", "sha384": "SHA-384", "sha512": "SHA-512"}
#: Findings pkilint reports on the demo issuing CA certificate, kept on purpose (see
#: docs/deploy.md "Interoperability"): the demo CA publishes no CRL, CPS or caIssuers,
#: and a serverAuth-only EKU (BR 7.1.2.10.6 forbids id-kp-OCSPSigning there) could make
#: clients that enforce EKU chaining reject the delegated responder certificates it issues.
DEMO_ISSUING_CA_FINDINGS = {
    "cabf.serverauth.ca.certificate_policies_extension_absent",
    "cabf.serverauth.ca.crl_distribution_points_extension_absent",
    "cabf.serverauth.ca.extended_key_usage_extension_absent",
    "cabf.serverauth.ca.authority_info_access_extension_absent",
}


@dataclass(frozen=True)
class Served:
    """One successful answer the running responder gave, and what it must say."""

    label: str
    der: bytes
    issuer: IssuerFiles
    serial: int
    alg: str = "sha1"
    expect: str = "good"
    reason: int | None = None  # RFC 5280 reasonCode; None: revoked without one
    nonce: bytes | None = None


@dataclass(frozen=True)
class Refused:
    """One unsigned error answer and the bytes it must be."""

    label: str
    der: bytes
    expected: bytes
    status: str  # as GnuTLS names it
    code: int  # responseStatus


@pytest.fixture(scope="module")
def issuers(p256_issuer: IssuerFiles, rsa_issuer: IssuerFiles, workdir: Path) -> list[IssuerFiles]:
    """P-256 delegated, RSA CA-signed, P-384 CA-signed, RSA delegated, P-521 delegated."""
    return [
        p256_issuer,
        rsa_issuer,
        issuer_files("p384", create_ca("p384", "Test P384"), workdir, delegated=False),
        issuer_files("rsa-delegated", create_ca("rsa2048", "Test RSA D"), workdir),
        issuer_files("p521", create_ca("p521", "Test P521"), workdir),
    ]


def post(url: str, der: bytes) -> bytes:
    reply = httpx.post(url, content=der, headers={"Content-Type": "application/ocsp-request"})
    assert reply.status_code == 200, reply.text
    return reply.content


def get(url: str, der: bytes) -> bytes:
    reply = httpx.get(get_url(url, der))
    assert reply.status_code == 200, reply.text
    return reply.content


def known_serial(dsn: str, issuer: str) -> int:
    """A serial the store knows (as from CT) with no stored response: signed on demand."""
    serial = secrets.randbits(120) | (1 << 119)
    [row] = sql_sync(dsn, "SELECT id FROM issuers WHERE name = $1", issuer)
    sql_sync(
        dsn,
        "INSERT INTO certificates (issuer_id, serial, not_after, kinds) VALUES ($1, $2, $3, 2)",
        row["id"],
        serial_key(serial),
        dt.datetime.now(dt.UTC) + dt.timedelta(days=90),
    )
    return serial


def served_for(
    proc: ResponderProcess, files: IssuerFiles, reasons: tuple[str, ...]
) -> list[Served]:
    """Good (every CertID hash, GET and POST, with and without nonce) and revoked answers."""
    ca: DemoCA = files.ca
    leaf = ca.issue_leaf(f"good.{files.name}.test")
    assert proc.record(leaf).status_code == 201
    serial = leaf.serial_number
    out = [
        Served(
            f"{files.name} good GET sha1 (pre-signed)",
            get(proc.url, build_request(leaf, ca.ca_cert)),
            files,
            serial,
        )
    ]
    nonce = secrets.token_bytes(16)
    der = post(proc.url, build_request(leaf, ca.ca_cert, alg="sha256", nonce=nonce))
    out.append(
        Served(f"{files.name} good POST sha256 nonce", der, files, serial, "sha256", nonce=nonce)
    )
    der = get(proc.url, build_request(leaf, ca.ca_cert, alg="sha384"))
    out.append(Served(f"{files.name} good GET sha384", der, files, serial, "sha384"))
    der = post(proc.url, build_request(leaf, ca.ca_cert, alg="sha512"))
    out.append(Served(f"{files.name} good POST sha512", der, files, serial, "sha512"))
    for reason in reasons:
        leaf = ca.issue_leaf(f"{reason.lower()}.{files.name}.test")
        assert proc.record(leaf).status_code == 201
        assert proc.revoke(files.name, leaf.serial_number, reason).status_code == 201
        flag = ALLOWED_REASONS[reason]
        code = None if reason == "unspecified" else REASON_CODES[flag]
        der = get(proc.url, build_request(leaf, ca.ca_cert))
        label = f"{files.name} revoked {reason} GET sha1"
        out.append(Served(label, der, files, leaf.serial_number, expect="revoked", reason=code))
        nonce = secrets.token_bytes(32)
        der = post(proc.url, build_request(leaf, ca.ca_cert, alg="sha256", nonce=nonce))
        out.append(
            Served(
                f"{files.name} revoked {reason} POST sha256 nonce",
                der,
                files,
                leaf.serial_number,
                "sha256",
                "revoked",
                code,
                nonce,
            )
        )
    return out


@pytest.fixture(scope="module")
def serving(
    module_database: str, issuers: list[IssuerFiles], workdir: Path
) -> Iterator[tuple[ResponderProcess, ResponderProcess]]:
    """`ocsp-responder serve` for every issuer, and one with no signing slot (tryLater)."""
    proc = write_config(workdir / "lint", module_database, issuers)
    busy = write_config(
        workdir / "busy", module_database, issuers[:1], extra="signing_queue_limit = 0"
    )
    try:
        yield proc.start(), busy.start()
    finally:
        busy.stop()
        proc.stop()


@pytest.fixture(scope="module")
def answers(
    serving: tuple[ResponderProcess, ResponderProcess],
    module_database: str,
    issuers: list[IssuerFiles],
) -> tuple[list[Served], list[Refused]]:
    """Every answer, as the running responders gave them."""
    proc, busy = serving
    served: list[Served] = []
    for i, files in enumerate(issuers):
        served += served_for(proc, files, tuple(ALLOWED_REASONS) if i == 0 else SOME_REASONS)
    first = issuers[0]
    unknown = build_request(None, first.ca.ca_cert, serial=secrets.randbits(100))
    on_demand = build_request(
        None, first.ca.ca_cert, serial=known_serial(module_database, first.name)
    )
    refused = [
        Refused("unknown serial GET", get(proc.url, unknown), UNAUTHORIZED, "unauthorized", 6),
        Refused(
            "garbage POST",
            post(proc.url, b"\x30\x03\x02\x01"),
            MALFORMED_REQUEST,
            "malformedRequest",
            1,
        ),
        Refused("no signing slot GET", get(busy.url, on_demand), TRY_LATER, "tryLater", 3),
    ]
    return served, refused


@pytest.fixture(scope="module")
def go_checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_checker(tmp_path_factory.mktemp("go"))


def test_every_answer_is_what_cryptography_and_openssl_expect(
    answers: tuple[list[Served], list[Refused]],
) -> None:
    """The baseline the other judges are compared with: status, nonce echo, reason."""
    served, refused = answers
    for s in served:
        checked = check_response(
            s.der, issuer=s.issuer, serial=s.serial, alg=s.alg, expect=s.expect, nonce=s.nonce
        )
        if s.expect == "revoked":
            reason = checked.response.revocation_reason
            code = None if reason is None else REASON_CODES[reason]
            assert code == s.reason, s.label
    for r in refused:
        assert r.der == r.expected, r.label


def test_pkilint_finds_nothing_in_any_answer(answers: tuple[list[Served], list[Refused]]) -> None:
    served, refused = answers
    found = {a.label: lint_ocsp_response(a.der) for a in [*served, *refused]}
    assert {label: f for label, f in found.items() if f} == {}
    assert len(found) == len(served) + len(refused)


def test_gnutls_verifies_every_answer(answers: tuple[list[Served], list[Refused]]) -> None:
    served, refused = answers
    for s in served:
        view = gnutls_verify(s.der, s.issuer.ca_pem, delegated=s.issuer.delegated)
        assert view.verified, (s.label, view.output)
        assert view.response_status == "Successful", s.label
        assert view.cert_status == s.expect, (s.label, view.output)
        assert view.serial == s.serial, s.label
        assert view.hash_algorithm == GNUTLS_HASH[s.alg], s.label
        assert view.nonce == s.nonce, (s.label, view.output)
    for r in refused:
        assert gnutls_response_status(r.der) == r.status, r.label


def test_gnutls_refuses_a_response_from_the_wrong_signer(
    answers: tuple[list[Served], list[Refused]],
) -> None:
    """The check above means something: GnuTLS does reject a signature it cannot verify."""
    served, _ = answers
    direct = next(s for s in served if not s.issuer.delegated)
    other = next(s for s in served if s.issuer is not direct.issuer and not s.issuer.delegated)
    view = gnutls_verify(direct.der, other.issuer.ca_pem, delegated=False)
    assert not view.verified, view.output


def test_go_parses_every_answer(
    answers: tuple[list[Served], list[Refused]], go_checker: Path
) -> None:
    served, refused = answers
    for s in served:
        view = go_parse(go_checker, s.der, s.issuer.ca_pem)
        assert view.accepted, (s.label, view.output)
        assert view.fields["status"] == s.expect, (s.label, view.output)
        assert int(view.fields["serial"], 16) == s.serial, s.label
        assert view.fields["hash"] == GO_HASH[s.alg], (s.label, view.output)
        # Go reports a missing reasonCode as unspecified (0)
        assert int(view.fields["reason"]) == (s.reason or 0), (s.label, view.output)
    for r in refused:
        view = go_parse(go_checker, r.der, served[0].issuer.ca_pem)
        assert view.fields.get("error-status") == str(r.code), (r.label, view.output)
    wrong = next(s for s in served if s.issuer is not served[0].issuer)
    assert not go_parse(go_checker, wrong.der, served[0].issuer.ca_pem).accepted


#: BR 7.1.3.2: the signature AlgorithmIdentifier, byte for byte, by signer key (ECDSA:
#: the hash goes with the curve; RSA: PKCS#1 v1.5 with SHA-256, NULL parameters)
_SIGNATURE_ALGORITHM_FOR_KEY = {
    "P-256": bytes.fromhex("300a06082a8648ce3d040302"),
    "P-384": bytes.fromhex("300a06082a8648ce3d040303"),
    "P-521": bytes.fromhex("300a06082a8648ce3d040304"),
    "RSA": bytes.fromhex("300d06092a864886f70d01010b0500"),
}


def signature_algorithm_der(der: bytes) -> bytes:
    """The BasicOCSPResponse's signatureAlgorithm TLV (it follows tbsResponseData)."""
    tbs = ocsp.load_der_ocsp_response(der).tbs_response_bytes
    rest = der[der.index(tbs) + len(tbs) :]
    assert rest[1] < 0x80
    return rest[: 2 + rest[1]]


def test_signature_algorithm_is_the_encoding_br_pairs_with_the_signer_key(
    answers: tuple[list[Served], list[Refused]],
) -> None:
    """A P-521 responder signed with ecdsa-with-SHA384 before: BR 7.1.3.2.2 asks SHA-512
    (pkilint's OCSP response linter does not check signature algorithms)."""
    served, _ = answers
    seen = set()
    for s in served:
        signer = s.issuer.ca.responder_cert if s.issuer.delegated else s.issuer.ca.ca_cert
        key = signer.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            kind = f"P-{key.curve.key_size}"
        else:
            assert isinstance(key, rsa.RSAPublicKey)
            kind = "RSA"
        assert signature_algorithm_der(s.der) == _SIGNATURE_ALGORITHM_FOR_KEY[kind], s.label
        seen.add(kind)
    assert seen == set(_SIGNATURE_ALGORITHM_FOR_KEY)


def test_delegated_responder_certificates_meet_the_br_profile(
    issuers: list[IssuerFiles], answers: tuple[list[Served], list[Refused]]
) -> None:
    """signer/demo_ca.py make_responder_certificate (demo and tests) against pkilint's
    BR 7.1.2.8 OCSP responder profile: it lacked subjectKeyIdentifier (a SHOULD)."""
    served, _ = answers
    embedded = {
        c.fingerprint(c.signature_hash_algorithm)  # type: ignore[arg-type]
        for s in served
        for c in ocsp.load_der_ocsp_response(s.der).certificates
    }
    linted = 0
    for files in issuers:
        if not files.delegated:
            continue
        cert = files.ca.responder_cert
        assert cert.fingerprint(cert.signature_hash_algorithm) in embedded  # type: ignore[arg-type]
        kind, findings = lint_certificate(cert)
        assert kind is CertificateType.OCSP_RESPONDER, files.name
        assert findings == [], (files.name, [str(f) for f in findings])
        assert lint_issued_by(files.ca_pem, files.directory / "responder.pem") == ""
        linted += 1
    assert linted == 3


def test_demo_ca_certificates_have_only_the_documented_findings(
    issuers: list[IssuerFiles],
) -> None:
    for files in issuers:
        kind, findings = lint_certificate(files.ca.root_cert)
        assert kind is CertificateType.ROOT_CA
        assert findings == [], (files.name, [str(f) for f in findings])
        kind, findings = lint_certificate(files.ca.ca_cert)
        assert kind is CertificateType.INTERNAL_UNCONSTRAINED_TLS_CA
        assert {f.code for f in findings} == DEMO_ISSUING_CA_FINDINGS, [str(f) for f in findings]
        assert lint_issued_by(files.root_pem, files.ca_pem) == "", files.name


def test_responder_certificate_subject_key_identifier_is_its_key() -> None:
    """The SKI added for BR 7.1.2.8.1 is the RFC 5280 method-1 hash of the responder key
    (what pkilint reports as method 1, and what responderID byKey carries)."""
    ca = create_ca("p256", "SKI")
    ski = ca.responder_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(ca.responder_key.public_key())


def leaf_pem(files: IssuerFiles, label: str, proc: ResponderProcess) -> tuple[Path, int]:
    """A recorded leaf of ``files``'s CA, written as PEM for a client to ask about."""
    leaf = files.ca.issue_leaf(f"{label}.{files.name}.test")
    assert proc.record(leaf).status_code == 201
    path = files.directory / f"{label}-leaf.pem"
    write_pem_cert(path, leaf)
    return path, leaf.serial_number


def test_gnutls_as_the_client_asks_and_accepts(
    serving: tuple[ResponderProcess, ResponderProcess], issuers: list[IssuerFiles]
) -> None:
    """`ocsptool --ask`: GnuTLS's own request and HTTP/1.0 POST, then its verification."""
    proc, _ = serving
    for files in issuers:
        path, serial = leaf_pem(files, "gnutls-ask", proc)
        view = gnutls_ask(proc.url + "/", path, files.ca_pem, delegated=files.delegated)
        assert view.verified, (files.name, view.output)
        assert (view.cert_status, view.serial, view.hash_algorithm) == ("good", serial, "SHA1")
        assert proc.revoke(files.name, serial, "superseded").status_code == 201
        view = gnutls_ask(proc.url + "/", path, files.ca_pem, delegated=files.delegated)
        assert view.verified, (files.name, view.output)
        assert view.cert_status == "revoked", (files.name, view.output)


def test_gnutls_ocsptool_insists_on_a_nonce_we_do_not_echo_when_pre_signed(
    serving: tuple[ResponderProcess, ResponderProcess], issuers: list[IssuerFiles]
) -> None:
    """Kept on purpose (docs/deploy.md "Interoperability"): a request with a nonce for a
    recorded certificate gets the pre-signed answer, which has none (RFC 5019 2.2.1 and
    RFC 9654 let a responder omit it; signing per nonce would let anyone make us sign at
    will). `ocsptool --ask --nonce` alone refuses that; gnutls-cli --ocsp and wget2 log
    "did not include the requested nonce" and accept. An answer signed on demand (here
    SHA-256, not pre-signed) echoes it: test_gnutls_verifies_every_answer."""
    proc, _ = serving
    files = issuers[0]
    path, _serial = leaf_pem(files, "gnutls-nonce", proc)
    view = gnutls_ask(proc.url + "/", path, files.ca_pem, delegated=True, nonce=True)
    assert not view.verified
    assert "could not read response's nonce" in view.output, view.output
    assert view.cert_status == "good" and view.nonce is None


def test_go_as_the_client_asks_and_accepts(
    serving: tuple[ResponderProcess, ResponderProcess],
    issuers: list[IssuerFiles],
    go_checker: Path,
) -> None:
    """ocsp.CreateRequest, POST or GET (base64 appended unescaped, '+' and '/' as they
    are), then ParseResponseForCert for that leaf: what Go stapling code does."""
    proc, _ = serving
    for files in issuers:
        path, serial = leaf_pem(files, "go-ask", proc)
        for method, alg in (
            ("POST", "sha1"),
            ("GET", "sha1"),
            ("POST", "sha256"),
            ("GET", "sha256"),
        ):
            view = go_ask(go_checker, method, proc.url + "/", path, files.ca_pem, alg)
            assert view.accepted, (files.name, method, alg, view.output)
            assert view.fields["status"] == "good", view.output
            assert int(view.fields["serial"], 16) == serial
            assert view.fields["hash"] == GO_HASH[alg], view.output
        assert proc.revoke(files.name, serial, "keyCompromise").status_code == 201
        view = go_ask(go_checker, "GET", proc.url + "/", path, files.ca_pem)
        assert (view.fields.get("status"), view.fields.get("reason")) == ("revoked", "1"), (
            files.name,
            view.output,
        )


def _responder_variant(ca: DemoCA, change: str) -> x509.Certificate:
    """The demo responder certificate with one BR 7.1.2.8 violation (``change``)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.responder_cert.subject)
        .issuer_name(ca.ca_cert.subject)
        .public_key(ca.responder_key.public_key())
        .serial_number(random_serial())
        .not_valid_before(ca.responder_cert.not_valid_before_utc)
        .not_valid_after(ca.responder_cert.not_valid_after_utc)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca.responder_key.public_key()), False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.ca_key.public_key()), False
        )
        .add_extension(x509.BasicConstraints(ca=change == "ca", path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                True, False, False, False, False, change == "keyCertSign", False, False, False
            ),
            True,
        )
    )
    if change == "policies":
        any_policy = x509.PolicyInformation(x509.ObjectIdentifier("2.5.29.32.0"), None)
        builder = builder.add_extension(x509.CertificatePolicies([any_policy]), False)
    return builder.sign(ca.ca_key, hashes.SHA256())


@pytest.mark.parametrize(
    ("change", "pkilint_code", "problem"),
    [
        ("ca", "basic_constraints_ca_bit_set", "basicConstraints cA"),
        ("keyCertSign", "prohibited_ku_present", "keyUsage must be digitalSignature only"),
        ("policies", "certificate_policies_extension_present", "CertificatePolicies"),
    ],
)
def test_loader_refuses_responder_certificates_pkilint_calls_misissued(
    demo_ca: DemoCA, change: str, pkilint_code: str, problem: str
) -> None:
    """`serve` refused a responder certificate without OCSPSigning, nocheck, AKI or with a
    SAN/CRLDP/nameConstraints, but took a CA certificate (cA TRUE: the 2020 "intermediate
    with id-kp-OCSPSigning" incident), keyCertSign/cRLSign bits, or certificatePolicies,
    all BR 7.1.2.8 ERRORs for pkilint. Now it names the problem and refuses."""
    cert = _responder_variant(demo_ca, change)
    _kind, findings = lint_certificate(cert, as_type=CertificateType.OCSP_RESPONDER)
    errors = {f.code for f in findings if f.severity == "ERROR"}
    assert f"cabf.serverauth.ocsp_responder.{pkilint_code}" in errors, errors
    issuer = issuer_from_certificate("lint", demo_ca.ca_cert)
    with pytest.raises(IssuerConfigError, match=r"BR 7\.1\.2\.8") as info:
        check_delegated_responder(issuer, cert)
    assert problem in str(info.value)
    check_delegated_responder(issuer, demo_ca.responder_cert)  # the good one passes
