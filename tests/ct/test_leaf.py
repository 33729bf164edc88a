"""Parsing of real and generated CT entries; issuer matching by key; malformed input."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from responder.ct import leaf
from responder.ct.errors import CTParseError, DERError, MalformedEntryError, MalformedTileError
from signer import der

from .fakelog import FIXTURES, ISSUERS, NAVIGLI
from .pki import DER, Pki
from .pki import leaf as make_leaf

STAGING = {"E5": "e5-cross.pem", "E6": "e6-cross.pem", "R10": "r10.pem", "R11": "r11.pem"}


def staging_issuers() -> dict[str, leaf.Issuer]:
    return {n: leaf.Issuer.from_certificate((ISSUERS / f).read_bytes()) for n, f in STAGING.items()}


def test_issuer_key_hash_is_sha256_of_whole_spki() -> None:
    for iss in staging_issuers().values():
        spki = iss.certificate.public_key().public_bytes(
            DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert iss.key_hash == hashlib.sha256(spki).digest()
        assert iss.subject_der == iss.certificate.subject.public_bytes()


def test_every_fixture_entry_parses_hashes_and_matches_its_issuer_by_key() -> None:
    issuers = staging_issuers()
    by_hash = {i.key_hash: n for n, i in issuers.items()}
    iset = leaf.IssuerSet(issuers.values())
    seen: dict[str, int] = {}
    serials = set()
    for k in range(4):
        tile = (NAVIGLI / "tile" / "data" / f"{k:03d}").read_bytes()
        level0 = (NAVIGLI / "tile" / "0" / f"{k:03d}").read_bytes()
        raws = list(leaf.iter_tile_entries(tile, 256, exact=True))
        assert len(raws) == 256
        for i, raw in enumerate(raws):
            idx = 256 * k + i
            assert raw.leaf_index == idx
            assert raw.entry_type == leaf.PRECERT_ENTRY
            assert leaf.leaf_hash_of(tile, raw) == level0[32 * i : 32 * i + 32]
            got = leaf.extract(tile, raw, idx, iset)
            assert isinstance(got, leaf.IndexedEntry)
            assert got.kind == "precert" and got.leaf_index == idx
            assert got.timestamp_ms == raw.timestamp_ms > 1_700_000_000_000
            # Independent check: the submitted precertificate that follows the TE.
            n = int.from_bytes(tile[raw.te_end : raw.te_end + 3], "big")
            pre = x509.load_der_x509_certificate(tile[raw.te_end + 3 : raw.te_end + 3 + n])
            assert pre.serial_number == got.serial
            # notAfter from our DER walk of the TBS = cryptography's, of the precertificate
            assert got.not_after == int(pre.not_valid_after_utc.timestamp())
            name = by_hash[got.issuer_key_hash]
            pre.verify_directly_issued_by(issuers[name].certificate)  # the key really signed it
            seen[name] = seen.get(name, 0) + 1
            serials.add((got.issuer_key_hash, got.serial))
    assert sum(seen.values()) == 1024 and len(serials) == 1024
    assert set(seen) == {"E5", "E6", "R10", "R11"}


def test_partial_fixture_tile_is_prefix_and_exact_width_is_enforced() -> None:
    partial = (NAVIGLI / "tile" / "data" / "003.p" / "10").read_bytes()
    full = (NAVIGLI / "tile" / "data" / "003").read_bytes()
    assert full.startswith(partial)
    hashes = (NAVIGLI / "tile" / "0" / "003.p" / "10").read_bytes()
    raws = list(leaf.iter_tile_entries(partial, 10, exact=True))
    assert [leaf.leaf_hash_of(partial, r) for r in raws] == [
        hashes[i : i + 32] for i in range(0, 320, 32)
    ]
    with pytest.raises(MalformedTileError):
        list(leaf.iter_tile_entries(partial, 9, exact=True))  # bytes left over
    assert len(list(leaf.iter_tile_entries(full, 10, exact=False))) == 10
    with pytest.raises(MalformedTileError):
        list(leaf.iter_tile_entries(partial, 11, exact=False))  # not enough entries


def test_other_issuers_are_skipped_without_parsing() -> None:
    only_r10 = leaf.IssuerSet([staging_issuers()["R10"]])
    tile = (NAVIGLI / "tile" / "data" / "000").read_bytes()
    got = [
        leaf.extract(tile, r, i, only_r10)
        for i, r in enumerate(leaf.iter_tile_entries(tile, 256, exact=True))
    ]
    ours = [g for g in got if g is not None]
    assert ours and len(ours) < 256
    assert {g.issuer_key_hash for g in ours if isinstance(g, leaf.IndexedEntry)} == {
        staging_issuers()["R10"].key_hash
    }


def test_rfc6962_fixture_x509_entries_parse_with_issuer_from_extra_data() -> None:
    data = json.loads((FIXTURES / "rfc6962-get-entries-2013.json").read_text())
    entries = data["entries"]
    assert len(entries) == 4
    for e in entries:
        li = base64.b64decode(e["leaf_input"])
        raw = leaf.parse_merkle_tree_leaf(li)
        assert raw.entry_type == leaf.X509_ENTRY
        pre, chain = leaf.parse_extra_data(base64.b64decode(e["extra_data"]), raw.entry_type)
        assert pre is None and chain
        cert = x509.load_der_x509_certificate(li[raw.body_start : raw.body_end])
        issuer = leaf.Issuer.from_certificate(chain[0])
        got = leaf.extract(li, raw, 7, leaf.IssuerSet([issuer]))
        assert isinstance(got, leaf.IndexedEntry), got
        assert got.kind == "x509" and got.serial == cert.serial_number
        assert got.not_after == int(cert.not_valid_after_utc.timestamp())  # a 2013 UTCTime
        assert got.issuer_key_hash == issuer.key_hash
        assert got.timestamp_ms == raw.timestamp_ms
        # Not ours when only an unrelated CA is configured.
        other = leaf.Issuer.from_certificate((ISSUERS / "r10.pem").read_bytes())
        assert leaf.extract(li, raw, 7, leaf.IssuerSet([other])) is None


def _te(etype: int, body: bytes) -> bytes:
    return (
        b"\x00" * 2
        + (1_700_000_000_000).to_bytes(8, "big")
        + etype.to_bytes(2, "big")
        + body
        + b"\x00\x00"
    )


def test_x509_issuer_confirmed_by_key_not_just_name(pki: Pki) -> None:
    ours = leaf.IssuerSet([pki.ca.cert, pki.ca_cross.cert])
    assert len(ours) == 1  # cross-signed copy: same key, same identity
    genuine = make_leaf(pki.ca, 0x1234).public_bytes(DER)
    fake = make_leaf(pki.impostor, 0x5678).public_bytes(DER)
    other = make_leaf(pki.other, 0x9999).public_bytes(DER)
    for cert, want in ((genuine, pki.ca.key_hash), (fake, None), (other, None)):
        li = _te(0, len(cert).to_bytes(3, "big") + cert)
        raw = leaf.parse_merkle_tree_leaf(li)
        got = leaf.extract(li, raw, 1, ours)
        if want is None:
            assert got is None
        else:
            assert isinstance(got, leaf.IndexedEntry)
            assert got.issuer_key_hash == want and got.serial == 0x1234
    # Configured by its cross-signed copy only, the CA still matches by key.
    li = _te(0, len(genuine).to_bytes(3, "big") + genuine)
    got = leaf.extract(li, leaf.parse_merkle_tree_leaf(li), 1, leaf.IssuerSet([pki.ca_cross.cert]))
    assert isinstance(got, leaf.IndexedEntry) and got.issuer_key_hash == pki.ca.key_hash


def test_der_walk_is_strict() -> None:
    tbs = make_leaf_tbs()
    assert der.tbs_serial_and_not_after(tbs)[0] == 0x0102
    bad = [
        tbs[:-1],  # truncated
        tbs + b"\x00",  # trailing
        b"\x31" + tbs[1:],  # wrong outer tag
    ]
    for b in bad:
        with pytest.raises(DERError):
            der.tbs_serial_and_not_after(b)
    # non-minimal INTEGER 00 01
    with pytest.raises(DERError):
        der.decode_integer(b"\x00\x01", 0, 2)
    assert der.decode_integer(b"\x00\x80", 0, 2) == 128
    assert der.decode_integer(b"\xff", 0, 1) == -1
    with pytest.raises(DERError):
        der.read_tlv(b"\x30\x81\x05abcde", 0, 8)  # long form for a short length


@pytest.mark.parametrize(
    ("tag", "text", "expected"),
    [
        (0x17, b"491231235959Z", "2049-12-31T23:59:59"),  # UTCTime: YY < 50 is 20YY
        (0x17, b"500101000000Z", "1950-01-01T00:00:00"),  # YY >= 50 is 19YY
        (0x18, b"20500101000000Z", "2050-01-01T00:00:00"),  # GeneralizedTime from 2050
        (0x17, b"240229120000Z", "2024-02-29T12:00:00"),  # a leap day
    ],
)
def test_times_decode_as_rfc5280_says(tag: int, text: bytes, expected: str) -> None:
    moment = dt.datetime.fromisoformat(expected).replace(tzinfo=dt.UTC)
    assert der.decode_time(text, tag, 0, len(text)) == int(moment.timestamp())


@given(
    st.datetimes(
        min_value=dt.datetime(1950, 1, 1),
        max_value=dt.datetime(9999, 12, 31, 23, 59, 59),
        timezones=st.just(dt.UTC),
    )
)
def test_times_match_the_calendar(moment: dt.datetime) -> None:
    """Every second from 1950 on: UTCTime up to 2049, GeneralizedTime after (RFC 5280)."""
    moment = moment.replace(microsecond=0)
    if moment.year < 2050:
        tag, text = 0x17, moment.strftime("%y%m%d%H%M%SZ").encode()
    else:
        tag, text = 0x18, moment.strftime("%Y%m%d%H%M%SZ").encode()
    assert der.decode_time(text, tag, 0, len(text)) == int(moment.timestamp())


@pytest.mark.parametrize(
    ("tag", "text"),
    [
        (0x17, b"4912312359Z"),  # no seconds
        (0x17, b"491231235959+0000"),  # an offset, not Z
        (0x18, b"20500101000000.5Z"),  # fractional seconds
        (0x17, b"230229120000Z"),  # no Feb 29 in 2023
        (0x17, b"491331235959Z"),  # month 13
        (0x17, b"49123124595aZ"),  # not digits
        (0x17, b"4912312359_5Z"),  # int() would take this one
        (0x17, b"491231 35959Z"),  # and this
        (0x13, b"491231235959Z"),  # not a Time tag
        (0x18, b"00000101000000Z"),  # year 0: no such year (and not before 1950)
        (0x18, b"19491231235959Z"),  # GeneralizedTime before 2050 is UTCTime's, until 1950
    ],
)
def test_times_are_strict(tag: int, text: bytes) -> None:
    with pytest.raises(DERError):
        der.decode_time(text, tag, 0, len(text))


def test_unparseable_validity_keeps_the_serial() -> None:
    """A defect in the Validity must not drop an issued serial from the index: its
    notAfter is unknown (None), the serial counts."""
    tbs = make_leaf_tbs()
    serial, not_after = der.tbs_serial_and_not_after(tbs)
    assert serial == 0x0102 and not_after is not None
    not_before = tbs.index(b"\x17\x0d")  # UTCTime, 13 bytes
    at = tbs.index(b"\x17\x0d", not_before + 15)  # notAfter: make it a PrintableString
    broken = tbs[:at] + b"\x13" + tbs[at + 1 :]
    assert der.tbs_serial_and_not_after(broken) == (0x0102, None)
    # a GeneralizedTime of year 0 (the calendar would raise ValueError) is a defect like
    # any other: a minimal TBSCertificate (serial, algorithm, issuer, Validity)
    validity = b"\x17\x0d491231235959Z" + b"\x18\x0f00000101000000Z"
    body = b"\x02\x01\x05" + b"\x30\x00" + b"\x30\x00" + b"\x30" + bytes([len(validity)])
    year0 = b"\x30" + bytes([len(body) + len(validity)]) + body + validity
    assert der.tbs_serial_and_not_after(year0) == (5, None)


def make_leaf_tbs() -> bytes:
    from .pki import make_ca

    ca = make_ca("x")
    return make_leaf(ca, 0x0102).tbs_certificate_bytes


def test_garbage_never_escapes_as_anything_but_parse_errors(pki: Pki) -> None:
    rng = random.Random(7)
    iset = leaf.IssuerSet([pki.ca.cert])
    cert = make_leaf(pki.ca, 77).public_bytes(DER)
    tbs = make_leaf(pki.ca, 78, precert=False).tbs_certificate_bytes
    samples = [
        _te(0, len(cert).to_bytes(3, "big") + cert),
        _te(1, pki.ca.key_hash + len(tbs).to_bytes(3, "big") + tbs),
    ]
    tile = (NAVIGLI / "tile" / "data" / "000").read_bytes()[:20000]
    for _ in range(1500):
        base = rng.choice(samples)
        b = bytearray(base)
        op = rng.randrange(3)
        if op == 0:
            b = b[: rng.randrange(len(b))]
        elif op == 1:
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        else:
            b.insert(rng.randrange(len(b)), rng.randrange(256))
        try:
            raw = leaf.parse_merkle_tree_leaf(bytes(b))
        except MalformedEntryError:
            continue
        got = leaf.extract(bytes(b), raw, 0, iset)
        assert got is None or isinstance(got, (leaf.IndexedEntry, leaf.MalformedEntry))
        t = bytearray(tile)
        t[rng.randrange(len(t))] ^= 1 << rng.randrange(8)
        try:
            for i, r in enumerate(leaf.iter_tile_entries(bytes(t), 256, exact=False)):
                leaf.extract(bytes(t), r, i, iset)
        except CTParseError:
            pass


def test_malformed_precert_of_ours_is_reported_not_indexed(pki: Pki) -> None:
    iset = leaf.IssuerSet([pki.ca.cert])
    junk = b"\x30\x03\x02\x01"  # TBS cut short
    li = _te(1, pki.ca.key_hash + len(junk).to_bytes(3, "big") + junk)
    got = leaf.extract(li, leaf.parse_merkle_tree_leaf(li), 5, iset)
    assert isinstance(got, leaf.MalformedEntry)
    assert got.leaf_index == 5 and got.issuer_key_hash == pki.ca.key_hash
    with pytest.raises(MalformedEntryError):
        leaf.parse_merkle_tree_leaf(_te(2, b"\x00\x00\x01x"))  # unknown entry type
