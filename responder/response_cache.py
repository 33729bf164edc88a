"""The in-process cache of response bytes, stored compactly and ready to send.

Entries are immutable; a hit costs one dict lookup on an integer key. Bounded: when full,
the oldest insertion is evicted (good enough for a working set dominated by recent
issuance), in O(1).

Memory is what limits how many responses one process holds (``cache_size`` defaults to a
million), so an entry keeps only what serving needs: the response bytes *without* the
delegated responder certificate that ends every delegated response (those ~500 identical
bytes are stored once, in :data:`SHARED_SUFFIXES`, and appended when sent), the three
times as integers and the ETag. HTTP dates are formatted on demand through a small memo.
"""

from __future__ import annotations

import hashlib
from collections import deque
from email.utils import formatdate
from functools import lru_cache

from signer.response_builder import CertStatus

#: CertID hash algorithm -> the low bits of a cache key.
ALGORITHM_BITS = {"sha1": 0, "sha256": 1, "sha384": 2, "sha512": 3}
_ISSUER_SHIFT = 2
_SERIAL_SHIFT = 18  # issuer ids are PostgreSQL smallints: 16 bits


def cache_key(issuer_id: int, serial: int, hash_algorithm: str) -> int:
    """One int per (issuer, serial, CertID hash): smaller and faster to hash than a tuple."""
    return (serial << _SERIAL_SHIFT) | (issuer_id << _ISSUER_SHIFT) | ALGORITHM_BITS[hash_algorithm]


CacheKey = int


class SharedSuffixes:
    """Byte strings that end many responses (responder certificates), kept once."""

    def __init__(self) -> None:
        self._suffixes: dict[bytes, bytes] = {}

    def register(self, suffix: bytes) -> None:
        """Remember a certificate that delegated responses end with (called at start)."""
        if suffix:
            self._suffixes.setdefault(suffix, suffix)

    def split(self, der: bytes) -> tuple[bytes, bytes]:
        """``der`` as (head, shared suffix): the suffix object is the one shared copy."""
        for suffix in self._suffixes:
            if len(der) > len(suffix) and der.endswith(suffix):
                return der[: -len(suffix)], suffix
        return der, b""


SHARED_SUFFIXES = SharedSuffixes()


@lru_cache(maxsize=8192)
def http_date(seconds: int) -> bytes:
    """RFC 9110 IMF-fixdate; memoised because many responses share their times."""
    return formatdate(seconds, usegmt=True).encode()


class ServedResponse:
    """A signed response ready to send: body plus the validators RFC 5019 asks for."""

    __slots__ = ("etag", "head", "next_update", "renew_at", "status", "tail", "this_update")

    def __init__(
        self,
        head: bytes,
        tail: bytes,
        status: CertStatus,
        this_update: int,
        next_update: int,
        renew_at: int,
        etag: bytes,
    ) -> None:
        self.head = head
        self.tail = tail
        self.status = status
        self.this_update = this_update
        self.next_update = next_update
        self.renew_at = renew_at  # after this moment the response is due for renewal
        self.etag = etag

    @classmethod
    def build(
        cls, der: bytes, status: CertStatus, this_update: int, next_update: int, renew_at: int
    ) -> ServedResponse:
        head, tail = SHARED_SUFFIXES.split(der)
        etag = b'"' + hashlib.sha256(der).hexdigest().encode() + b'"'
        return cls(head, tail, status, this_update, next_update, renew_at, etag)

    @property
    def der(self) -> bytes:
        """The whole DER response (the shared certificate appended)."""
        return self.head + self.tail if self.tail else self.head


class ResponseCache:
    """Response bytes by :func:`cache_key` (issuer, serial, hash algorithm)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: dict[CacheKey, ServedResponse] = {}
        #: bumped by every invalidation: a lookup that started before one must not put
        #: what it found (it may be the "good" a revocation just replaced)
        self.generation = 0
        #: whole-cache clears (the invalidation listener reconnected): a loader of an
        #: older snapshot must stop then
        self.clears = 0
        # insertion order for eviction, kept apart from the dict: deleting a dict's first
        # items leaves holes that ``next(iter(dict))`` walks over, O(n) per eviction once
        # a full cache churns; a deque pops in O(1) for 8 bytes an entry
        self._order: deque[CacheKey] = deque()
        #: while a warm-up loads an older snapshot: the serials invalidated meanwhile
        self._dropped: set[tuple[int, int]] | None = None
        #: whether invalidations reach this cache now (an invalidation listener is
        #: listening, or none is attached): when not, an entry may be a "good" that a
        #: revocation replaced, and is served only when the store cannot be read
        self.invalidations_heard = True

    def get(self, key: CacheKey) -> ServedResponse | None:
        return self._entries.get(key)

    def put(self, key: CacheKey, entry: ServedResponse) -> None:
        if self.max_entries <= 0:
            return
        entries = self._entries
        if key not in entries:
            while len(entries) >= self.max_entries and self._order:
                entries.pop(self._order.popleft(), None)  # keys dropped earlier: no-op
            self._order.append(key)
        entries[key] = entry

    def watch_drops(self) -> set[tuple[int, int]]:
        """Start recording the (issuer id, serial) of every ``drop_serial`` from now on,
        into the set returned (for a loader of an older snapshot; ``unwatch`` ends it)."""
        self._dropped = set()
        return self._dropped

    def unwatch(self) -> None:
        self._dropped = None

    def drop_serial(self, issuer_id: int, serial: int) -> int:
        """Forget every hash-algorithm variant of one serial (after a revocation)."""
        self.generation += 1
        if self._dropped is not None:
            self._dropped.add((issuer_id, serial))
        dropped = 0
        for alg in ALGORITHM_BITS:
            if self._entries.pop(cache_key(issuer_id, serial, alg), None) is not None:
                dropped += 1
        return dropped

    def clear(self) -> None:
        self.generation += 1
        self.clears += 1
        self._entries.clear()
        self._order.clear()

    def __len__(self) -> int:
        return len(self._entries)
