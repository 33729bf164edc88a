"""Request decoding: the GET path forms and strict DER, tried on many inputs."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from responder.protocol import MalformedRequest, decode_get_path, parse_request
from tests.support import (
    build_request,
    cert_id_request,
    critical_extension_request,
    duplicated_nonce_request,
    with_single_request_extension,
)


@pytest.fixture(scope="module")
def request_der(demo_ca):  # type: ignore[no-untyped-def]
    return build_request(demo_ca.issue_leaf("p.test"), demo_ca.ca_cert)


def test_path_forms_decode_identically(request_der: bytes) -> None:
    b64 = base64.b64encode(request_der).decode()
    url_safe = base64.urlsafe_b64encode(request_der).decode()
    forms = [
        url_safe,
        url_safe.rstrip("="),
        quote(url_safe, safe=""),
        b64,
        quote(b64, safe=""),
        b64.replace("+", " "),
        b64.replace("+", "%20"),
        "/" + b64,
        "//" + b64,
        b64.rstrip("="),
    ]
    for form in forms:
        assert decode_get_path(form.encode()) == request_der, form


def test_parse_request_fields(demo_ca) -> None:  # type: ignore[no-untyped-def]
    cert = demo_ca.issue_leaf("fields.test")
    parsed = parse_request(build_request(cert, demo_ca.ca_cert, alg="sha256", nonce=b"n" * 16))
    assert parsed.serial == cert.serial_number
    assert parsed.hash_algorithm == "sha256"
    assert parsed.nonce == b"n" * 16


def test_a_request_needing_both_url_safe_characters_decodes(demo_ca) -> None:  # type: ignore[no-untyped-def]
    """The URL-safe form was refused as malformedRequest; mixing the alphabets still is."""
    for serial in range(1, 4000):
        der = build_request(None, demo_ca.ca_cert, serial=serial)
        std = base64.b64encode(der)
        if b"+" in std and b"/" in std:
            break
    assert b"+" in std and b"/" in std
    url_safe = base64.urlsafe_b64encode(der)
    assert decode_get_path(url_safe) == der
    mixed = url_safe.replace(b"-", b"+", 1)
    with pytest.raises(MalformedRequest, match="mixes"):
        decode_get_path(mixed)


def test_any_amount_of_padding_reads_the_same(demo_ca) -> None:  # type: ignore[no-untyped-def]
    """Padding carries no data. Extra or partial ``=`` was refused for some request
    lengths and read for others (``QUJD==`` read, ``QUI==`` and ``QQ=`` refused)."""
    for serial in (1, 300, 70000):  # DER lengths giving each base64 padding (0, 1, 2)
        der = build_request(None, demo_ca.ca_cert, serial=serial)
        bare = base64.b64encode(der).rstrip(b"=")
        for padding in (b"", b"=", b"==", b"==="):
            assert decode_get_path(bare + padding) == der, (serial, padding)
            assert decode_get_path(bare + padding.replace(b"=", b"%3D")) == der


@pytest.mark.parametrize("bad", [b"", b"=", b"A", b"!!!!", b"%ZZ", b"M" * 5, b"QQ=A", b"A==="])
def test_bad_paths(bad: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_request(decode_get_path(bad))


def test_nonce_length_limits(demo_ca) -> None:  # type: ignore[no-untyped-def]
    cert = demo_ca.issue_leaf("nonce.test")
    assert parse_request(build_request(cert, demo_ca.ca_cert, nonce=b"x" * 128)).nonce == b"x" * 128
    for bad in (b"", b"x" * 129):
        with pytest.raises(MalformedRequest):
            parse_request(build_request(cert, demo_ca.ca_cert, nonce=bad))


def test_nonce_form_is_noted_for_the_echo(demo_ca) -> None:  # type: ignore[no-untyped-def]
    """RFC 8954 wrapped form vs the bare extnValue (RFC 2560 reading): same nonce, and
    the echo must copy the form the client used."""
    cert, ca = demo_ca.issue_leaf("form.test"), demo_ca.ca_cert
    wrapped = parse_request(critical_extension_request(cert, ca, x509.OCSPNonce(b"n" * 16)))
    bare = x509.UnrecognizedExtension(x509.oid.OCSPExtensionOID.NONCE, b"n" * 16)
    unwrapped = parse_request(critical_extension_request(cert, ca, bare, critical=False))
    assert (wrapped.nonce, wrapped.nonce_wrapped) == (b"n" * 16, True)
    assert (unwrapped.nonce, unwrapped.nonce_wrapped) == (b"n" * 16, False)


def test_duplicated_extension_is_malformed(demo_ca) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MalformedRequest, match="bad request extensions"):
        parse_request(duplicated_nonce_request(demo_ca.ca_cert, 5))


def test_critical_request_extensions_we_do_not_understand_are_refused(demo_ca) -> None:  # type: ignore[no-untyped-def]
    """RFC 6960 4.4: an unrecognised extension may be ignored only if it is not critical.
    A critical one in requestExtensions or in the Request's singleRequestExtensions was
    ignored and answered as if absent."""
    cert, ca = demo_ca.issue_leaf("crit.test"), demo_ca.ca_cert
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")
    with pytest.raises(MalformedRequest, match=r"critical request extension 1\.2\.3\.4"):
        parse_request(critical_extension_request(cert, ca, unknown))
    assert parse_request(critical_extension_request(cert, ca, unknown, critical=False))
    # extensions we act on may be critical
    nonce = parse_request(critical_extension_request(cert, ca, x509.OCSPNonce(b"n" * 16)))
    assert nonce.nonce == b"n" * 16
    basic = x509.ObjectIdentifier("1.3.6.1.5.5.7.48.1.1")
    other = x509.ObjectIdentifier("1.2.3.5")
    assert parse_request(
        critical_extension_request(cert, ca, x509.OCSPAcceptableResponses([basic]))
    )
    with pytest.raises(MalformedRequest, match="critical request extension"):
        parse_request(critical_extension_request(cert, ca, x509.OCSPAcceptableResponses([other])))
    # singleRequestExtensions: none is supported, so any critical one is refused
    plain = build_request(cert, ca)
    critical = with_single_request_extension(plain, critical=True)
    assert critical != plain
    with pytest.raises(MalformedRequest, match="critical singleRequestExtension"):
        parse_request(critical)
    lenient = with_single_request_extension(plain, critical=False)
    assert parse_request(lenient).serial == cert.serial_number


def test_duplicated_single_request_extension_is_malformed(demo_ca) -> None:  # type: ignore[no-untyped-def]
    """RFC 5280 4.2, as in requestExtensions: the same non-critical extnID twice in the
    Request's singleRequestExtensions was accepted."""
    twice = with_single_request_extension(
        build_request(None, demo_ca.ca_cert, serial=5), critical=False, times=2
    )
    with pytest.raises(MalformedRequest, match="singleRequestExtension repeated"):
        parse_request(twice)


SHA1, SHA256 = "1.3.14.3.2.26", "2.16.840.1.101.3.4.2.1"


@pytest.mark.parametrize(
    ("alg", "name_hash", "key_hash"),
    [
        (SHA1, b"n" * 19, b"k" * 20),  # truncated
        (SHA1, b"n" * 20, b"k" * 32),  # a SHA-256 key hash under SHA-1
        (SHA256, b"n" * 20, b"k" * 20),  # SHA-1 hashes labelled SHA-256
        (SHA1, b"", b""),
    ],
)
def test_cert_id_hashes_of_the_wrong_length_are_malformed(
    alg: str, name_hash: bytes, key_hash: bytes
) -> None:
    """They were taken for an unknown issuer and answered ``unauthorized``."""
    with pytest.raises(MalformedRequest, match="digests"):
        parse_request(cert_id_request(alg, name_hash, key_hash, 5))


@pytest.mark.parametrize("null_params", [True, False])
@pytest.mark.parametrize(("alg", "size"), [(SHA1, 20), (SHA256, 32)])
def test_hash_parameters_absent_or_null_both_read(alg: str, size: int, null_params: bool) -> None:
    """Both forms of the hash AlgorithmIdentifier occur in the field (RFC 5754 2)."""
    parsed = parse_request(
        cert_id_request(alg, b"n" * size, b"k" * size, 5, null_params=null_params)
    )
    assert (parsed.serial, len(parsed.issuer_key_hash)) == (5, size)


@pytest.mark.parametrize("content", [b"\x00\x05", b"\xff\xfb", b""])
def test_non_minimal_serial_encodings_are_refused(content: bytes) -> None:
    """Never read as another serial: 00 05 (5 spelled long) and ff fb (-5 spelled long)."""
    with pytest.raises(MalformedRequest):
        parse_request(cert_id_request(SHA1, b"n" * 20, b"k" * 20, 5, serial_content=content))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    """Any input either parses or raises MalformedRequest (or the unsupported-hash error)."""
    try:
        parse_request(data)
    except ValueError:
        pass
    try:
        parse_request(decode_get_path(data))
    except ValueError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2000), st.binary(min_size=1, max_size=3))
def test_mutated_requests_never_crash(request_der: bytes, position: int, junk: bytes) -> None:
    pos = position % (len(request_der) + 1)
    mutated = request_der[:pos] + junk + request_der[pos + len(junk) :]
    try:
        parse_request(mutated)
    except ValueError:
        pass
