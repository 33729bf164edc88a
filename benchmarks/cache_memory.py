"""RSS of the in-process response cache filled with N realistic entries.

    .venv/bin/python benchmarks/cache_memory.py [--entries 1000000]

Entries are real delegated P-256 responses (the responder certificate included, as
served): a few thousand are signed, and the rest are copies with a distinct serial
written into the same bytes (same size and layout as a real one; signing a million
would take minutes). Times are spread over four days, as for responses signed at
issuance. Prints one JSON line: entries, RSS before/after, bytes per entry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from responder.response_cache import SHARED_SUFFIXES, ResponseCache, ServedResponse, cache_key
from signer.demo_ca import create_ca
from signer.issuers import issuer_from_certificate, make_responder
from signer.response_builder import CertStatus, ValidityPolicy, sign_response


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--signed", type=int, default=2000, help="really signed templates")
    args = ap.parse_args()
    ca = create_ca("p256", "Memory")
    issuer = issuer_from_certificate("m", ca.ca_cert)
    issuer.responders.append(
        make_responder(issuer, ca.responder_cert, ca.responder_key, delegated=True)
    )
    SHARED_SUFFIXES.register(ca.responder_cert.public_bytes(Encoding.DER))
    policy = ValidityPolicy()
    start = dt.datetime.now(dt.UTC)
    templates = []
    for i in range(args.signed):
        serial = (0x40 << 119) | i
        signed = sign_response(
            issuer, serial, CertStatus.GOOD, policy, now=start - dt.timedelta(seconds=i % 3000)
        )
        marker = serial.to_bytes(16, "big")
        assert signed.der.count(marker) == 1
        templates.append((signed, signed.der.index(marker)))
    gc.collect()
    cache = ResponseCache(args.entries)
    before = rss_bytes()
    for n in range(args.entries):
        signed, at = templates[n % len(templates)]
        serial = (0x41 << 119) | n
        der = signed.der[:at] + serial.to_bytes(16, "big") + signed.der[at + 16 :]
        shift = (n * 331) % (4 * 86400)  # spread over four days of issuance
        this_update = signed.this_update - shift
        next_update = signed.next_update - shift
        entry = ServedResponse.build(
            der, signed.status, this_update, next_update, next_update - 2 * 86400
        )
        cache.put(cache_key(1, serial, "sha1"), entry)
    gc.collect()
    after = rss_bytes()
    print(
        json.dumps(
            {
                "entries": len(cache),
                "response_bytes": len(templates[0][0].der),
                "rss_before_mib": before / 2**20,
                "rss_mib": after / 2**20,
                "bytes_per_entry": (after - before) / max(len(cache), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
