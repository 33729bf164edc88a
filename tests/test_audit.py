"""The audit's judgement of one answer: every kind of violation is named, valid ones pass."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from responder.audit import Target, build_request, check_answer
from signer.demo_ca import DemoCA, create_ca, make_responder_certificate
from signer.issuers import issuer_from_certificate

SERIAL = 0x1234_5678_9ABC
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def respond(
    ca: DemoCA,
    *,
    serial: int = SERIAL,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    alg: hashes.HashAlgorithm | None = None,
    this_update: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    name_hash: bytes | None = None,
) -> bytes:
    """A response built with cryptography, wrong in exactly the way asked."""
    alg = alg or hashes.SHA1()
    issuer = issuer_from_certificate("t", ca.ca_cert)
    names = {"sha1": "sha1", "sha256": "sha256"}
    nh, kh = issuer.cert_id_hashes[names[alg.name]]
    cert, key = signer or (ca.responder_cert, ca.responder_key)
    revoked = status == ocsp.OCSPCertStatus.REVOKED
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            name_hash or nh,
            kh,
            serial,
            alg,
            status,
            this_update or NOW - dt.timedelta(hours=1),
            next_update or NOW + dt.timedelta(days=3),
            NOW - dt.timedelta(days=1) if revoked else None,
            x509.ReasonFlags.key_compromise if revoked else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
    )
    if cert is not ca.ca_cert:
        builder = builder.certificates([cert])
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def target(demo_ca: DemoCA) -> Target:
    return Target(issuer_from_certificate("t", demo_ca.ca_cert), SERIAL, revoked=False)


def verdict(target: Target, body: bytes, status: int = 200, revoked: bool = False) -> str:
    t = Target(target.issuer, target.serial, revoked)
    v = check_answer(t, status, body)
    return v.what if v.ok else f"BAD:{v.what}"


def test_valid_answers_pass(demo_ca: DemoCA, target: Target) -> None:
    assert verdict(target, respond(demo_ca)) == "good"
    revoked = respond(demo_ca, status=ocsp.OCSPCertStatus.REVOKED)
    assert verdict(target, revoked, revoked=True) == "revoked"
    # signed by the issuer itself
    issuer_signed = respond(demo_ca, signer=(demo_ca.ca_cert, demo_ca.ca_key))  # type: ignore[arg-type]
    assert verdict(target, issuer_signed) == "good"


def test_error_statuses_and_transport(demo_ca: DemoCA, target: Target) -> None:
    for status, name in (
        (ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized"),
        (ocsp.OCSPResponseStatus.TRY_LATER, "try-later"),
        (ocsp.OCSPResponseStatus.INTERNAL_ERROR, "internal-error"),
        (ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "error-status"),
    ):
        body = ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
            serialization.Encoding.DER
        )
        assert verdict(target, body) == f"BAD:{name}"
    assert verdict(target, b"", status=500) == "BAD:http-error"
    assert verdict(target, b"not der") == "BAD:malformed"


def test_unknown_wrong_certid_stale_and_wrong_status(demo_ca: DemoCA, target: Target) -> None:
    assert verdict(target, respond(demo_ca, status=ocsp.OCSPCertStatus.UNKNOWN)) == "BAD:unknown"
    assert verdict(target, respond(demo_ca, serial=SERIAL + 1)) == "BAD:wrong-certid"
    assert verdict(target, respond(demo_ca, alg=hashes.SHA256())) == "BAD:wrong-certid"
    assert verdict(target, respond(demo_ca, name_hash=b"\x00" * 20)) == "BAD:wrong-certid"
    past = respond(
        demo_ca,
        this_update=NOW - dt.timedelta(days=5),
        next_update=NOW - dt.timedelta(hours=1),
    )
    assert verdict(target, past) == "BAD:stale"
    future = respond(demo_ca, this_update=NOW + dt.timedelta(hours=1))
    assert verdict(target, future) == "BAD:stale"
    assert verdict(target, respond(demo_ca), revoked=True) == "BAD:wrong-status"


def test_bad_signatures(demo_ca: DemoCA, target: Target) -> None:
    # The right responder certificate, but the signature does not verify.
    good = respond(demo_ca)
    sig = ocsp.load_der_ocsp_response(good).signature
    forged = good.replace(sig, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert forged != good
    assert verdict(target, forged) == "BAD:bad-signature"
    # A responder certificate another CA issued (OCSP signing EKU and all).
    other = create_ca("p256", "Other")
    assert verdict(
        target, respond(demo_ca, signer=(other.responder_cert, other.responder_key))
    ) == (  # type: ignore[arg-type]
        "BAD:bad-signature"
    )
    # A certificate of the issuer, but not for OCSP signing.
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = make_responder_certificate(demo_ca.ca_cert, demo_ca.ca_key, leaf_key)
    not_ocsp = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(demo_ca.ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .sign(demo_ca.ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    assert verdict(target, respond(demo_ca, signer=(not_ocsp, leaf_key))) == "BAD:bad-signature"


def test_request_is_one_sha1_certid(demo_ca: DemoCA, target: Target) -> None:
    req = ocsp.load_der_ocsp_request(build_request(target.issuer, SERIAL))
    assert isinstance(req.hash_algorithm, hashes.SHA1) and req.serial_number == SERIAL
    assert (req.issuer_name_hash, req.issuer_key_hash) == target.issuer.cert_id_hashes["sha1"]
