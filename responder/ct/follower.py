"""Follow one CT log: fetch, verify, filter, and hand out resumable batches.

Trust model: nothing is yielded before it verified against a tree head whose
signature verified with the configured log key.

* Static CT: per data tile, the leaf hashes we compute from the entries are
  appended to the stored compact range (which commits to every earlier leaf),
  the rest of the tree ``[tile_end, tree_size)`` is filled in from the
  higher-level hash tiles as maximal perfect subtrees, and the resulting root
  must equal the checkpoint root. That one comparison verifies the entries, the
  hash tiles used, and that the new tree extends the previously verified one.
  On a mismatch the level-0 hash tile is fetched to name the bad entry.
* RFC 6962: entries of a batch are appended to the compact range; if the batch
  ends at the STH size its root must equal the STH root, otherwise an inclusion
  proof (``get-proof-by-hash``) of the batch's last leaf must lead to the STH
  root *and* its left siblings must equal our compact range of everything
  before that leaf, which pins every leaf of the batch.
* ``start_index``: a follower below it jumps there. The compact range of the
  leaves it skips comes from the log (hash tiles, or the audit path of the leaf
  before it) and is checked against the signed root before anything else uses
  it; a stored frontier is kept and must be extended by it, as on any poll.
  From there on the two rules above apply unchanged.

The caller stores ``batch.new_state`` in the same transaction as
``batch.entries``; a follower built from a stored state resumes exactly there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from . import merkle
from .checkpoint import LogKey, TreeHead, verify_checkpoint, verify_sth
from .client import DEFAULT_MAX_BODY, RetryPolicy, RFC6962Client, StaticCTClient
from .errors import (
    InclusionProofError,
    LeafIndexMismatchError,
    LogRollbackError,
    MalformedEntryError,
    MalformedResponseError,
    NotFoundError,
    ResumeStateError,
    RootMismatchError,
    ShortResponseError,
    StartIndexError,
)
from .leaf import (
    IndexedEntry,
    IssuerSet,
    MalformedEntry,
    RawEntry,
    SuspiciousEntry,
    extract,
    iter_tile_entries,
    leaf_hash_of,
    parse_merkle_tree_leaf,
)
from .merkle import CompactRange

log = logging.getLogger(__name__)

STATE_VERSION = 1
LogKind = Literal["rfc6962", "static"]


@dataclass(frozen=True)
class LogConfig:
    """How to reach and trust one log, and which issuers we index from it."""

    url: str  # monitoring prefix (static) or log URL (RFC 6962)
    kind: LogKind
    public_key: str | bytes  # PEM, or base64/DER SubjectPublicKeyInfo
    issuers: IssuerSet
    origin: str | None = None  # static checkpoint origin; default: url without scheme
    batch_size: int = 4096  # max entries scanned per yielded batch
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_body: int = DEFAULT_MAX_BODY
    empty_page_retries: int = 3  # RFC 6962: empty get-entries pages tolerated in a row
    #: the first leaf to index: a follower whose position is below it jumps there (its
    #: frontier taken from the log and verified against the signed head) instead of
    #: reading every older entry first; leaves before it are never indexed
    start_index: int = 0

    def checkpoint_origin(self) -> str:
        if self.origin is not None:
            return self.origin
        return self.url.split("://", 1)[-1].rstrip("/")


@dataclass(frozen=True)
class ResumeState:
    """Where a follower stands in a log: opaque to the caller, JSON-serializable.

    ``next_index`` is the first leaf not yet handed out; ``frontier`` is the
    compact range of ``[0, next_index)``; ``head_*`` is the last verified tree
    head (refusing to go back below it detects a rolled-back log).
    """

    log_id: bytes
    next_index: int
    frontier: tuple[bytes, ...]
    head_size: int
    head_root: bytes
    head_timestamp_ms: int | None

    @classmethod
    def initial(cls, log_id: bytes) -> ResumeState:
        return cls(log_id, 0, (), 0, merkle.EMPTY_ROOT, None)

    def compact_range(self) -> CompactRange:
        return CompactRange(self.next_index, self.frontier)

    def to_dict(self) -> dict[str, Any]:
        b64 = base64.b64encode
        return {
            "v": STATE_VERSION,
            "log_id": b64(self.log_id).decode(),
            "next_index": self.next_index,
            "frontier": [b64(h).decode() for h in self.frontier],
            "head": {
                "size": self.head_size,
                "root": b64(self.head_root).decode(),
                "timestamp_ms": self.head_timestamp_ms,
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> ResumeState:
        """Parse and validate a stored state (raises ResumeStateError)."""
        try:
            obj = json.loads(data) if isinstance(data, (str, bytes)) else data
            if obj["v"] != STATE_VERSION:
                raise ResumeStateError(f"unsupported resume state version {obj['v']!r}")
            b64 = base64.b64decode
            head = obj["head"]
            ts = head["timestamp_ms"]
            st = cls(
                log_id=b64(obj["log_id"], validate=True),
                next_index=obj["next_index"],
                frontier=tuple(b64(h, validate=True) for h in obj["frontier"]),
                head_size=head["size"],
                head_root=b64(head["root"], validate=True),
                head_timestamp_ms=ts,
            )
        except ResumeStateError:
            raise
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ResumeStateError(f"bad resume state: {exc!r}") from exc
        ints = (st.next_index, st.head_size)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints):
            raise ResumeStateError("sizes must be non-negative integers")
        if not (ts is None or isinstance(ts, int)):
            raise ResumeStateError("bad head timestamp")
        if len(st.log_id) != 32 or len(st.head_root) != 32 or st.next_index > st.head_size:
            raise ResumeStateError("inconsistent resume state")
        st.compact_range()  # validates the frontier shape
        return st


@dataclass(frozen=True)
class Batch:
    """Verified entries of leaves ``[start, end)`` plus the state to commit with them."""

    entries: list[IndexedEntry]
    malformed: list[MalformedEntry]
    start: int
    end: int
    tree_size: int  # size of the verified tree head these leaves were checked against
    new_state: ResumeState
    #: entries naming our issuer_key_hash that our issuer did not sign: never indexed
    suspicious: list[SuspiciousEntry] = field(default_factory=list)
    #: leaves ``[start, end)`` were jumped over to reach ``start_index``, not read
    skipped: bool = False

    @property
    def scanned(self) -> int:
        return 0 if self.skipped else self.end - self.start


#: Static CT chain certificates cached per follower, and fetches allowed per poll
CHAIN_CACHE = 64
CHAIN_FETCHES = 64


#: what ``extract`` makes of an entry that is (or claims to be) ours
Found = IndexedEntry | MalformedEntry | SuspiciousEntry


def _file(
    found: Found,
    entries: list[IndexedEntry],
    malformed: list[MalformedEntry],
    suspicious: list[SuspiciousEntry],
) -> None:
    """Put what ``extract`` made of one entry into the batch list it belongs to."""
    if isinstance(found, IndexedEntry):
        entries.append(found)
    elif isinstance(found, SuspiciousEntry):
        suspicious.append(found)
    else:
        malformed.append(found)


def _scan_tile(
    data: bytes, width: int, exact: bool, base: int, pos: int, issuers: IssuerSet
) -> tuple[list[bytes], list[tuple[RawEntry, int, Found]]]:
    """One data tile from leaf ``pos`` on: every leaf hash, and what ``extract`` made of
    each entry that is ours (or claims to be). Pure and CPU-bound: run in a thread."""
    hashes: list[bytes] = []
    scanned: list[tuple[RawEntry, int, Found]] = []
    for i, raw in enumerate(iter_tile_entries(data, width, exact=exact)):
        idx = base + i
        if idx < pos:
            continue
        if raw.leaf_index != idx:
            raise LeafIndexMismatchError(f"entry {idx} carries leaf_index {raw.leaf_index}")
        hashes.append(leaf_hash_of(data, raw))
        found = extract(data, raw, idx, issuers)
        if found is not None:
            scanned.append((raw, idx, found))
    return hashes, scanned


def _scan_page(
    page: list[tuple[bytes, bytes]], first: int, issuers: IssuerSet
) -> list[Found | None]:
    """What ``extract`` makes of each entry of one get-entries page starting at leaf
    ``first`` (None: not ours). Pure and CPU-bound: run in a thread."""
    out: list[Found | None] = []
    for idx, (leaf_input, extra) in enumerate(page, start=first):
        try:
            raw = parse_merkle_tree_leaf(leaf_input)
        except MalformedEntryError as exc:
            out.append(MalformedEntry(idx, f"MerkleTreeLeaf: {exc}", None))
            continue
        if raw.leaf_index is not None and raw.leaf_index != idx:
            raise LeafIndexMismatchError(f"entry {idx} carries leaf_index {raw.leaf_index}")
        out.append(extract(leaf_input, raw, idx, issuers, extra_data=extra))
    return out


class _HashTileCache:
    """Hash tiles needed for the right border of one tree head (bounded LRU)."""

    def __init__(self, client: StaticCTClient, tree_size: int, capacity: int = 16) -> None:
        self.client = client
        self.tree_size = tree_size
        self.capacity = capacity
        self.tiles: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()

    async def get(self, level: int, index: int) -> list[bytes]:
        key = (level, index)
        if key in self.tiles:
            self.tiles.move_to_end(key)
            return self.tiles[key]
        width = merkle.tile_width(level, index, self.tree_size)
        hashes = await self.client.hash_tile(level, index, width)
        self.tiles[key] = hashes
        if len(self.tiles) > self.capacity:
            self.tiles.popitem(last=False)
        return hashes

    async def subtree(self, level: int, first_leaf: int) -> bytes:
        tl, ti, off, count = merkle.subtree_location(level, first_leaf)
        hashes = await self.get(tl, ti)
        return merkle.root_of(hashes[off : off + count])


class LogFollower:
    """Follows one log from a stored :class:`ResumeState` (None = from leaf 0)."""

    def __init__(
        self,
        config: LogConfig,
        state: ResumeState | str | bytes | Mapping[str, Any] | None = None,
        *,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.config = config
        self.key = LogKey(config.public_key)
        if state is None:
            state = ResumeState.initial(self.key.log_id)
        elif not isinstance(state, ResumeState):
            state = ResumeState.from_json(state)
        if state.log_id != self.key.log_id:
            raise ResumeStateError("resume state belongs to another log (log ID differs)")
        self.state: ResumeState = state
        #: the last tree head that verified (signature and consistency with ``state``),
        #: even if the batches after it failed: the caller may show how far behind it is
        self.verified_head: TreeHead | None = None
        #: Static CT chain certificates fetched by fingerprint (None: the log has none)
        self._chain_certs: OrderedDict[bytes, bytes] = OrderedDict()
        self._fetch_budget = CHAIN_FETCHES
        client_cls = StaticCTClient if config.kind == "static" else RFC6962Client
        self.client = client_cls(
            config.url, http=http, retry=config.retry, max_body=config.max_body
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __aenter__(self) -> LogFollower:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def fetch_head(self) -> TreeHead:
        """Fetch and signature-verify the current tree head; check it against our state."""
        if isinstance(self.client, StaticCTClient):
            note = await self.client.checkpoint()
            head = verify_checkpoint(note, self.key, self.config.checkpoint_origin())
        else:
            assert isinstance(self.client, RFC6962Client)
            head = verify_sth(await self.client.get_sth(), self.key)
        st = self.state
        if head.tree_size < st.head_size or head.tree_size < st.next_index:
            raise LogRollbackError(
                f"signed tree size {head.tree_size} is below verified size {st.head_size}"
            )
        if head.tree_size == st.head_size and head.root_hash != st.head_root:
            raise LogRollbackError("two different signed roots for the same tree size")
        if head.tree_size == st.next_index and st.compact_range().root() != head.root_hash:
            raise RootMismatchError("signed root does not extend the verified tree")
        self.verified_head = head
        return head

    async def poll_once(self) -> AsyncIterator[Batch]:
        """Catch up to the current tree head, yielding verified batches, then stop.

        Commit each batch's ``new_state`` with its entries before asking for the
        next; the follower advances its own ``state`` as it yields.
        """
        head = await self.fetch_head()
        self._fetch_budget = CHAIN_FETCHES
        if self.state.next_index < self.config.start_index:
            jump = await self._jump(head)
            self.state = jump.new_state
            yield jump
        gen = self._static(head) if self.config.kind == "static" else self._rfc6962(head)
        async for batch in gen:
            self.state = batch.new_state
            yield batch
        if self.state.head_size != head.tree_size:
            # Nothing new to index but a newer head verified: remember it.
            self.state = self._state(self.state.compact_range(), head)

    def _state(self, cr: CompactRange, head: TreeHead) -> ResumeState:
        return ResumeState(
            self.key.log_id,
            cr.size,
            tuple(cr.nodes),
            head.tree_size,
            head.root_hash,
            head.timestamp_ms,
        )

    # --- start_index ---------------------------------------------------------------

    async def _jump(self, head: TreeHead) -> Batch:
        """Move the position up to ``start_index`` without reading the leaves before it.

        The compact range of ``[0, start_index)`` comes from the log (Static CT: its hash
        tiles; RFC 6962: the audit path of leaf ``start_index - 1``) and is verified
        against the signed head before it is used, so every batch after the jump is
        checked exactly as if the follower had read the whole log. A follower that has a
        position already jumps from its stored frontier, not past it: the log's tree must
        still extend the one it verified (a split view is refused, as without a jump). A
        log that is smaller than ``start_index`` is refused (StartIndexError): the
        position stays.
        """
        start, n = self.config.start_index, head.tree_size
        if start > n:
            raise StartIndexError(f"start_index {start} is beyond the log's signed tree size {n}")
        if self.config.kind == "static":
            cr = await self._static_prefix(start, head)
        else:
            cr = await self._rfc6962_prefix(start, head)
            held = self.state.compact_range()
            if held.size and await self._rfc6962_prefix(held.size, head) != held:
                raise InclusionProofError(
                    f"audit path of leaf {held.size - 1} contradicts the verified leaves "
                    f"[0, {held.size}) (jump to leaf {start})"
                )
        log.warning(
            "CT log %s: jumping from leaf %d to start_index %d; leaves before it are not indexed",
            self.config.url,
            self.state.next_index,
            start,
        )
        return Batch([], [], self.state.next_index, start, n, self._state(cr, head), skipped=True)

    async def _static_prefix(self, start: int, head: TreeHead) -> CompactRange:
        cache = _HashTileCache(self._static_client(), head.tree_size)
        # from the stored frontier, so that the root check below also proves the signed
        # tree extends the one verified before (as every batch's check does)
        cr = self.state.compact_range()
        held = cr.size
        for level, leaf in merkle.decompose(held, start):
            cr.append_subtree(level, await cache.subtree(level, leaf))
        probe = cr.copy()
        for level, leaf in merkle.decompose(start, head.tree_size):
            probe.append_subtree(level, await cache.subtree(level, leaf))
        if probe.root() != head.root_hash:
            ours = f"the verified leaves [0, {held}) and " if held else ""
            raise RootMismatchError(
                f"{ours}the hash tiles do not hash to the checkpoint root (jump to leaf {start})"
            )
        return cr

    async def _rfc6962_prefix(self, start: int, head: TreeHead) -> CompactRange:
        if start == 0:
            return CompactRange()
        page = await self._entries_page(start - 1, start - 1)
        last_hash = merkle.leaf_hash(page[0][0])
        path = await self._audit_path(start - 1, last_hash, head)
        lefts = merkle.verify_inclusion(start - 1, head.tree_size, last_hash, path, head.root_hash)
        cr = CompactRange(start - 1, lefts[::-1])
        cr.append(last_hash)
        return cr

    def _static_client(self) -> StaticCTClient:
        assert isinstance(self.client, StaticCTClient)
        return self.client

    # --- Static CT --------------------------------------------------------------

    async def _static(self, head: TreeHead) -> AsyncIterator[Batch]:
        assert isinstance(self.client, StaticCTClient)
        n = head.tree_size
        cr = self.state.compact_range()
        cache = _HashTileCache(self.client, n)
        issuers = self.config.issuers
        while cr.size < n:
            start = cr.size
            target = min(n, start + max(1, self.config.batch_size))
            entries: list[IndexedEntry] = []
            malformed: list[MalformedEntry] = []
            suspicious: list[SuspiciousEntry] = []
            while cr.size < target:
                pos = cr.size
                k = pos // merkle.TILE_WIDTH
                base = k * merkle.TILE_WIDTH
                width = min(merkle.TILE_WIDTH, n - base)
                data, is_full = await self.client.data_tile(k, width)
                exact = not is_full or width == merkle.TILE_WIDTH
                # parsing, hashing and (for our precertificates) signature verification
                # run in a thread: cryptography lets go of the GIL while it verifies, so a
                # follower inside `serve` leaves the event loop free for OCSP answers
                hashes, scanned = await asyncio.to_thread(
                    _scan_tile, data, width, exact, base, pos, issuers
                )
                for raw, idx, found in scanned:
                    if isinstance(found, SuspiciousEntry) and found.want_issuer is not None:
                        first = await self._chain_cert(found.want_issuer)
                        if first is not None:
                            again = extract(data, raw, idx, issuers, chain_first=first)
                            if again is None:
                                continue
                            found = again
                    _file(found, entries, malformed, suspicious)
                del data
                new = cr.copy()
                new.extend(hashes)
                await self._verify_static(new, head, cache, k, pos, hashes)
                cr = new
            yield Batch(entries, malformed, start, cr.size, n, self._state(cr, head), suspicious)

    async def _chain_cert(self, fingerprint: bytes) -> bytes | None:
        """The log's certificate for a tile's chain fingerprint, cached (bounded).

        Only asked for entries naming our key hash whose precertificate our key did
        not sign directly (a Precertificate Signing Certificate's). A log without it
        (404) or serving another body leaves the entry unverified, hence unindexed.
        Failed fetches are not cached (they would evict real signing CAs) but
        budgeted per poll: forged entries must not buy one request each.
        """
        if fingerprint in self._chain_certs:
            self._chain_certs.move_to_end(fingerprint)
            return self._chain_certs[fingerprint]
        if self._fetch_budget <= 0:
            return None
        self._fetch_budget -= 1
        assert isinstance(self.client, StaticCTClient)
        try:
            der = await self.client.issuer(fingerprint)
        except (NotFoundError, MalformedResponseError) as exc:
            log.debug("CT log chain certificate %s unavailable: %s", fingerprint.hex(), exc)
            if self._fetch_budget == 0:
                log.warning(
                    "CT log %s: chain certificate fetch budget of this poll spent", self.config.url
                )
            return None
        self._chain_certs[fingerprint] = der
        if len(self._chain_certs) > CHAIN_CACHE:
            self._chain_certs.popitem(last=False)
        return der

    async def _verify_static(
        self,
        cr: CompactRange,
        head: TreeHead,
        cache: _HashTileCache,
        tile: int,
        first: int,
        hashes: list[bytes],
    ) -> None:
        probe = cr.copy()
        for level, leaf in merkle.decompose(cr.size, head.tree_size):
            probe.append_subtree(level, await cache.subtree(level, leaf))
        if probe.root() == head.root_hash:
            return
        # Name the culprit if the log's own leaf hashes disagree with the data.
        assert isinstance(self.client, StaticCTClient)
        base = tile * merkle.TILE_WIDTH
        width = min(merkle.TILE_WIDTH, head.tree_size - base)
        published = await self.client.hash_tile(0, tile, width)
        merkle.find_leaf_mismatch(first, hashes, published[first - base :])
        raise RootMismatchError(
            f"leaves [{first}, {cr.size}) and the hash tiles do not hash to the checkpoint root"
        )

    # --- RFC 6962 ------------------------------------------------------------------

    async def _rfc6962(self, head: TreeHead) -> AsyncIterator[Batch]:
        assert isinstance(self.client, RFC6962Client)
        n = head.tree_size
        cr = self.state.compact_range()
        issuers = self.config.issuers
        while cr.size < n:
            start = cr.size
            target = min(n, start + max(1, self.config.batch_size))
            entries: list[IndexedEntry] = []
            malformed: list[MalformedEntry] = []
            suspicious: list[SuspiciousEntry] = []
            before_last = cr
            last_hash = b""
            while cr.size < target:
                page = await self._entries_page(cr.size, target - 1)
                page = page[: target - cr.size]
                # parsing and (for our precertificates) signature verification run in a
                # thread, as for Static CT tiles: the event loop stays free meanwhile
                found_in_page = await asyncio.to_thread(_scan_page, page, cr.size, issuers)
                for i, (leaf_input, _) in enumerate(page):
                    idx = cr.size
                    last_hash = merkle.leaf_hash(leaf_input)
                    found = found_in_page[i]
                    if found is not None:
                        _file(found, entries, malformed, suspicious)
                    if idx == target - 1:
                        before_last = cr.copy()
                    cr.append(last_hash)
            await self._verify_rfc6962(cr, before_last, last_hash, head)
            yield Batch(entries, malformed, start, cr.size, n, self._state(cr, head), suspicious)

    async def _entries_page(self, start: int, end: int) -> list[tuple[bytes, bytes]]:
        """One non-empty get-entries page from ``start``: a log may answer a few empty
        pages in a row (tolerated ``empty_page_retries`` times, with the retry delay)."""
        assert isinstance(self.client, RFC6962Client)
        empty = 0
        while not (page := await self.client.get_entries(start, end)):
            empty += 1
            if empty > self.config.empty_page_retries:
                raise ShortResponseError(f"get-entries from {start} returned nothing")
            await asyncio.sleep(self.config.retry.delay(empty, None))
        return page

    async def _verify_rfc6962(
        self, cr: CompactRange, before_last: CompactRange, last_hash: bytes, head: TreeHead
    ) -> None:
        if cr.size == head.tree_size:
            if cr.root() != head.root_hash:
                raise RootMismatchError(f"leaves [0, {cr.size}) do not hash to the STH root")
            return
        index = cr.size - 1
        path = await self._audit_path(index, last_hash, head)
        lefts = merkle.verify_inclusion(index, head.tree_size, last_hash, path, head.root_hash)
        if lefts != before_last.nodes[::-1]:
            raise InclusionProofError("audit path contradicts the leaves fetched before it")

    async def _audit_path(self, index: int, leaf_hash: bytes, head: TreeHead) -> list[bytes]:
        """The audit path of leaf ``index`` (whose hash is ``leaf_hash``) in ``head``'s
        tree; the caller verifies it (merkle.verify_inclusion)."""
        assert isinstance(self.client, RFC6962Client)
        proved, path = await self.client.get_proof_by_hash(leaf_hash, head.tree_size)
        if proved < index:
            # the log holds this leaf more than once (RFC 6962 logs may log a submission
            # twice) and proved an earlier copy: ask for the proof of ours by its index
            log.info(
                "CT log %s: leaf %d is a duplicate of leaf %d; proving it by index",
                self.config.url,
                index,
                proved,
            )
            try:
                leaf_input, path = await self.client.get_entry_and_proof(index, head.tree_size)
            except NotFoundError as exc:
                raise InclusionProofError(
                    f"leaf {index} duplicates leaf {proved} and the log does not serve "
                    "get-entry-and-proof, the only proof by index"
                ) from exc
            if merkle.leaf_hash(leaf_input) != leaf_hash:
                raise InclusionProofError(f"get-entry-and-proof returned another leaf {index}")
        elif proved != index:
            raise InclusionProofError(f"proof is for leaf {proved}, expected {index}")
        return path
