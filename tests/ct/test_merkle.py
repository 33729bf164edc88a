"""Merkle hashing, compact ranges, proofs and tile geometry vs. the fake's naive RFC 6962."""

from __future__ import annotations

import hashlib

import pytest

from responder.ct import merkle
from responder.ct.errors import InclusionProofError, ResumeStateError

from .fakelog import NAVIGLI, FakeLog


def naive_log(n: int) -> FakeLog:
    log = FakeLog()
    log.leaf_hashes = [hashlib.sha256(b"\x00" + i.to_bytes(4, "big")).digest() for i in range(n)]
    return log


def test_compact_range_root_matches_naive_mth_for_every_size() -> None:
    log = naive_log(300)
    cr = merkle.CompactRange()
    assert cr.root() == hashlib.sha256(b"").digest()
    for i, h in enumerate(log.leaf_hashes):
        cr.append(h) if i % 2 else cr.extend([h])
        assert cr.size == i + 1 and len(cr.nodes) == (i + 1).bit_count()
        assert cr.root() == log.mth(0, i + 1) == merkle.root_of(log.leaf_hashes[: i + 1])


def test_compact_range_serialization_roundtrip_and_validation() -> None:
    log = naive_log(77)
    cr = merkle.CompactRange()
    cr.extend(log.leaf_hashes)
    again = merkle.CompactRange.from_json(cr.to_json())
    assert again == cr and again.root() == cr.root()
    with pytest.raises(ResumeStateError):
        merkle.CompactRange(77, cr.nodes[:-1])
    with pytest.raises(ResumeStateError):
        merkle.CompactRange.from_json({"size": 1, "nodes": ["!!"]})


def test_right_border_from_subtrees_equals_root() -> None:
    log = naive_log(1000)
    for cut in (0, 1, 256, 300, 512, 999, 1000):
        cr = merkle.CompactRange()
        cr.extend(log.leaf_hashes[:cut])
        for level, first in merkle.decompose(cut, 1000):
            assert first % (1 << level) == 0
            cr.append_subtree(level, log.mth(first, first + (1 << level)))
        assert cr.size == 1000 and cr.root() == log.mth(0, 1000)
    assert merkle.decompose(256, 70000)[0] == (8, 256)
    with pytest.raises(ValueError):
        merkle.CompactRange(3, [b"a" * 32, b"b" * 32]).append_subtree(1, b"c" * 32)


def test_inclusion_proofs_and_left_siblings() -> None:
    log = naive_log(37)
    root = log.mth(0, 37)
    for m in range(37):
        lefts = merkle.verify_inclusion(m, 37, log.leaf_hashes[m], log.path(m, 0, 37), root)
        prefix = merkle.CompactRange()
        prefix.extend(log.leaf_hashes[:m])
        assert lefts == prefix.nodes[::-1]
    with pytest.raises(InclusionProofError):
        merkle.verify_inclusion(5, 37, log.leaf_hashes[6], log.path(5, 0, 37), root)
    with pytest.raises(InclusionProofError):
        merkle.verify_inclusion(5, 37, log.leaf_hashes[5], log.path(5, 0, 37)[:-1], root)


def test_tile_paths_and_widths() -> None:
    assert merkle.tile_path("data", 0) == "tile/data/000"
    assert merkle.tile_path(0, 3, 10) == "tile/0/003.p/10"
    assert merkle.tile_path(1, 1234067) == "tile/1/x001/x234/067"
    assert merkle.tile_path(2, 1000, 5) == "tile/2/x001/000.p/5"
    # The spec's example: a tree of 70,000 leaves.
    assert merkle.tile_width(0, 273, 70000) == 112
    assert merkle.tile_width(1, 0, 70000) == 256 and merkle.tile_width(1, 1, 70000) == 17
    assert merkle.tile_width(2, 0, 70000) == 1 and merkle.tile_width(0, 274, 70000) == 0
    assert merkle.subtree_location(9, 512 * 3) == (1, 0, 6, 2)


def test_level1_hash_of_fixture_tiles_is_mth_of_level0() -> None:
    full = [(NAVIGLI / "tile" / "0" / f"{k:03d}").read_bytes() for k in range(4)]
    hashes = [t[i : i + 32] for t in full for i in range(0, 8192, 32)]
    log = FakeLog()
    log.leaf_hashes = hashes
    assert merkle.root_of(hashes) == log.mth(0, 1024)
