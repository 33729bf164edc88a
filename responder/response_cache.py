"""The in-process cache of response bytes, with the HTTP header values pre-built.

Entries are immutable; a hit costs one dict lookup. Bounded: when full, the oldest
insertion is evicted (good enough for a working set dominated by recent issuance).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from email.utils import formatdate

from signer.response_builder import CertStatus


@dataclass(frozen=True, slots=True)
class ServedResponse:
    """A signed response ready to send: body plus the validators RFC 5019 asks for."""

    der: bytes
    status: CertStatus
    this_update: int
    next_update: int
    renew_at: int  # after this moment the response is due for renewal: look further down
    etag: bytes
    last_modified: bytes
    expires: bytes

    @classmethod
    def build(
        cls, der: bytes, status: CertStatus, this_update: int, next_update: int, renew_at: int
    ) -> ServedResponse:
        return cls(
            der=der,
            status=status,
            this_update=this_update,
            next_update=next_update,
            renew_at=renew_at,
            etag=b'"' + hashlib.sha256(der).hexdigest().encode() + b'"',
            last_modified=formatdate(this_update, usegmt=True).encode(),
            expires=formatdate(next_update, usegmt=True).encode(),
        )


CacheKey = tuple[int, int, str]  # (issuer db id, serial, CertID hash algorithm)


class ResponseCache:
    """Response bytes by (issuer, serial, hash algorithm)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: dict[CacheKey, ServedResponse] = {}
        #: bumped by every invalidation: a lookup that started before one must not put
        #: what it found (it may be the "good" a revocation just replaced)
        self.generation = 0

    def get(self, key: CacheKey) -> ServedResponse | None:
        return self._entries.get(key)

    def put(self, key: CacheKey, entry: ServedResponse) -> None:
        if self.max_entries <= 0:
            return
        entries = self._entries
        if key not in entries and len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entries[key] = entry

    def drop_serial(self, issuer_id: int, serial: int) -> int:
        """Forget every hash-algorithm variant of one serial (after a revocation)."""
        self.generation += 1
        dropped = 0
        for alg in ("sha1", "sha256", "sha384", "sha512"):
            if self._entries.pop((issuer_id, serial, alg), None) is not None:
                dropped += 1
        return dropped

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
