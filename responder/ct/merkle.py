"""RFC 6962 Merkle tree hashing, a serializable compact range, and tile geometry.

The follower's memory of a log is a :class:`CompactRange` over ``[0, size)``:
the hashes of the perfect subtrees given by the set bits of ``size`` (largest
first). It is enough to extend the tree leaf by leaf and to recompute the root,
so it is what the resume state stores. Because it commits to every leaf
already indexed, checking that ``frontier + new leaves + right border`` hashes
to a newly signed root also proves the new tree extends the old one.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence

from .errors import (
    InclusionProofError,
    LeafHashMismatchError,
    MalformedResponseError,
    ResumeStateError,
)

HASH_SIZE = 32
TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def leaf_hash(leaf: bytes) -> bytes:
    """SHA-256(0x00 || leaf)."""
    return _sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def root_of(hashes: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes (any length), by RFC 6962's recursive split."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(root_of(hashes[:k]), root_of(hashes[k:]))


class CompactRange:
    """Right-border frontier of the tree ``[0, size)``: one hash per set bit of size."""

    __slots__ = ("nodes", "size")

    def __init__(self, size: int = 0, nodes: Iterable[bytes] = ()) -> None:
        self.size = size
        self.nodes = list(nodes)
        if size < 0 or len(self.nodes) != size.bit_count():
            raise ResumeStateError("compact range must hold one hash per set bit of its size")
        if any(len(h) != HASH_SIZE for h in self.nodes):
            raise ResumeStateError("compact range hashes must be 32 bytes")

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self.nodes)

    def append(self, leaf_hash_: bytes) -> None:
        """Append one leaf hash (like incrementing a binary counter)."""
        self.append_subtree(0, leaf_hash_)

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        nodes = self.nodes
        size = self.size
        for h in leaf_hashes:
            # inline binary-counter merge for the hot path
            s = size
            while s & 1:
                h = _sha256(b"\x01" + nodes.pop() + h).digest()
                s >>= 1
            nodes.append(h)
            size += 1
        self.size = size

    def append_subtree(self, level: int, h: bytes) -> None:
        """Append the hash of a perfect subtree of 2**level leaves at position ``size``."""
        if self.size & ((1 << level) - 1):
            raise ValueError("subtree is not aligned to the range's end")
        s = self.size >> level
        while s & 1:
            h = node_hash(self.nodes.pop(), h)
            s >>= 1
        self.nodes.append(h)
        self.size += 1 << level

    def root(self) -> bytes:
        """MTH of ``[0, size)``: fold the frontier right to left."""
        if not self.nodes:
            return EMPTY_ROOT
        h = self.nodes[-1]
        for left in reversed(self.nodes[:-1]):
            h = node_hash(left, h)
        return h

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "nodes": [base64.b64encode(h).decode() for h in self.nodes]}

    @classmethod
    def from_json(cls, obj: object) -> CompactRange:
        try:
            assert isinstance(obj, dict)
            size = obj["size"]
            nodes = [base64.b64decode(x, validate=True) for x in obj["nodes"]]
            assert isinstance(size, int) and not isinstance(size, bool)
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise ResumeStateError(f"bad compact range: {exc!r}") from exc
        return cls(size, nodes)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CompactRange)
            and self.size == other.size
            and self.nodes == other.nodes
        )

    def __repr__(self) -> str:
        return f"CompactRange(size={self.size}, nodes={len(self.nodes)})"


def decompose(start: int, end: int) -> list[tuple[int, int]]:
    """Split ``[start, end)`` into maximal aligned perfect subtrees: (level, first leaf)."""
    out: list[tuple[int, int]] = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else (end - start).bit_length() - 1
        while start + (1 << level) > end:
            level -= 1
        out.append((level, start))
        start += 1 << level
    return out


# --- inclusion proofs (RFC 6962 get-proof-by-hash) ---------------------------


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> list[bytes]:
    """Check an audit path (RFC 9162 2.1.3.2) and return its left siblings, bottom up.

    The left siblings are exactly the perfect subtrees of ``[0, leaf_index)``,
    i.e. the compact range of that prefix in reverse order, which lets the
    caller check a whole batch of leaves against one proof.
    """
    if leaf_index >= tree_size or leaf_index < 0:
        raise InclusionProofError("leaf index outside the tree")
    fn, sn, r = leaf_index, tree_size - 1, leaf
    lefts: list[bytes] = []
    for p in proof:
        if len(p) != HASH_SIZE or sn == 0:
            raise InclusionProofError("malformed or over-long audit path")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            lefts.append(p)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise InclusionProofError("audit path does not lead to the signed root")
    return lefts


# --- tiles -------------------------------------------------------------------


def tile_index_path(index: int) -> str:
    """Encode a tile index as 3-digit path elements, all but the last x-prefixed."""
    digits = f"{index:03d}"
    pad = (-len(digits)) % 3
    digits = "0" * pad + digits
    parts = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join([*("x" + p for p in parts[:-1]), parts[-1]])


def tile_path(level: int | str, index: int, width: int = TILE_WIDTH) -> str:
    """``tile/<L>/<N>[.p/<W>]`` relative to the monitoring prefix."""
    if not 0 < width <= TILE_WIDTH:
        raise ValueError("tile width must be 1..256")
    suffix = "" if width == TILE_WIDTH else f".p/{width}"
    return f"tile/{level}/{tile_index_path(index)}{suffix}"


def tile_width(level: int, index: int, tree_size: int) -> int:
    """Width of tile (level, index) in a tree of ``tree_size`` leaves (0 if absent)."""
    n = tree_size >> (TILE_HEIGHT * level)
    return max(0, min(TILE_WIDTH, n - index * TILE_WIDTH))


def split_hashes(tile: bytes, width: int) -> list[bytes]:
    """The first ``width`` hashes of a hash tile (a full tile may stand in for a partial)."""
    if len(tile) < width * HASH_SIZE or len(tile) % HASH_SIZE:
        raise MalformedResponseError("hash tile has the wrong length")
    return [tile[i : i + HASH_SIZE] for i in range(0, width * HASH_SIZE, HASH_SIZE)]


def subtree_location(level: int, first_leaf: int) -> tuple[int, int, int, int]:
    """Where a perfect subtree's hash comes from in the hash tiles.

    Returns (tile_level, tile_index, offset, count): the subtree is the MTH of
    ``count`` consecutive hashes at ``offset`` in that tile (count is a power of
    two below 256, so they never straddle two tiles).
    """
    tl = level // TILE_HEIGHT
    r = level % TILE_HEIGHT
    j = first_leaf >> (TILE_HEIGHT * tl)
    return tl, j // TILE_WIDTH, j % TILE_WIDTH, 1 << r


def find_leaf_mismatch(first_index: int, ours: Sequence[bytes], published: Sequence[bytes]) -> None:
    """Raise LeafHashMismatchError for the first of our leaf hashes the log disagrees with."""
    for i, (a, b) in enumerate(zip(ours, published, strict=False)):
        if a != b:
            raise LeafHashMismatchError(first_index + i)
