"""CT ingest throughput: parse + filter + verify on the real navigli2025h2 tiles.

Per entry this does what the follower does per data tile: walk the TileLeaf
framing, recompute the Merkle leaf hash, filter by issuer (all four staging
issuers configured, so every entry is ours and has its serial parsed), fold the
hashes into the compact range, and compare each tile's leaf hashes and subtree
root with the published level-0 hash tile. No network.

    .venv/bin/python benchmarks/ct_ingest.py [--rounds N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from responder.ct import merkle
from responder.ct.leaf import (
    IndexedEntry,
    Issuer,
    IssuerSet,
    extract,
    iter_tile_entries,
    leaf_hash_of,
)

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "ct"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=25, help="passes over the 1,024 entries")
    args = ap.parse_args()
    tiles = [(FIXTURES / f"navigli2025h2/tile/data/{k:03d}").read_bytes() for k in range(4)]
    level0 = [(FIXTURES / f"navigli2025h2/tile/0/{k:03d}").read_bytes() for k in range(4)]
    issuers = IssuerSet(
        Issuer.from_certificate((FIXTURES / "issuers" / n).read_bytes())
        for n in ("e5-cross.pem", "e6-cross.pem", "r10.pem", "r11.pem")
    )
    best = 0.0
    for _ in range(3):
        found = entries = 0
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            cr = merkle.CompactRange()
            for tile, published in zip(tiles, level0, strict=True):
                hashes = []
                for i, raw in enumerate(iter_tile_entries(tile, 256, exact=True)):
                    hashes.append(leaf_hash_of(tile, raw))
                    if isinstance(extract(tile, raw, i, issuers), IndexedEntry):
                        found += 1
                if b"".join(hashes) != published:
                    raise SystemExit("leaf hashes do not match the level-0 tile")
                cr.extend(hashes)
                entries += len(hashes)
            if cr.root() != merkle.root_of(
                [published[i : i + 32] for published in level0 for i in range(0, 8192, 32)]
            ):
                raise SystemExit("root mismatch")
        dt = time.perf_counter() - t0
        best = max(best, entries / dt)
        assert found == entries
    print(
        f"ct_ingest: {best:,.0f} entries/s "
        f"(parse+filter+verify, {entries} entries per run, best of 3)"
    )


if __name__ == "__main__":
    main()
