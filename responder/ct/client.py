"""Async HTTP fetchers for RFC 6962 and Static CT logs (httpx).

Everything here is transport: retries, size bounds, gzip, 404 fallbacks. None
of it is trusted; the follower verifies what these functions return.

* 429, 500, 502, 503, 504 and transport errors are retried with bounded
  exponential backoff and full jitter; a ``Retry-After`` header (seconds or
  HTTP date) raises the delay up to ``RetryPolicy.max_delay``.
* Bodies are streamed and capped at ``max_body`` bytes, so one tile or one
  get-entries page is the most memory a fetch can take; tree heads and proofs
  have their own small cap (``MAX_SMALL_BODY``).
* Each attempt has an overall deadline (``RetryPolicy.total_timeout``): httpx's
  timeout applies per read, so a body dripped one byte at a time would never
  time out. A missed deadline is transient: retried like a 503.
* Tiles may be gzip-compressed either via ``Content-Encoding: gzip`` (inflated
  here, streaming, with the same cap: a gzip bomb never lands in memory) or as
  a raw gzip body, recognised by its magic bytes.
* get-entries pages are bounded by the number of entries asked for before the
  JSON is decoded (RFC 6962 allows fewer entries, never more).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import json
import random
import time
import zlib
from dataclasses import dataclass
from typing import Any

import httpx

from . import merkle
from .errors import (
    FetchError,
    MalformedResponseError,
    NotFoundError,
    ResponseTooLargeError,
    RetriesExhaustedError,
)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_MAX_BODY = 64 << 20
#: checkpoints/STHs (a signed note is at most 64 KiB) and inclusion proofs
MAX_SMALL_BODY = 1 << 16
#: one entry with its chain and proof (get-entry-and-proof)
MAX_ENTRY_AND_PROOF_BODY = 1 << 20
#: JSON structure characters ({ [ , :) allowed per requested get-entries entry (a
#: compliant entry has 5), plus slack: bounds the objects json.loads can build
ENTRY_TOKENS = 16
PAGE_TOKEN_SLACK = 64


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout: float = 30.0  # per connect/read/write (httpx)
    total_timeout: float | None = None  # per attempt, whole body; None: 3 x timeout

    @property
    def deadline(self) -> float:
        return self.total_timeout if self.total_timeout is not None else 3 * self.timeout

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_delay, self.base_delay * (2**attempt))
        d = random.uniform(backoff / 2, backoff)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_delay))
        return d


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _gunzip(url: str, body: bytes, limit: int) -> bytes:
    """A raw gzip body (a tile served without Content-Encoding), inflated under the same
    cap as a Content-Encoding one."""
    inflated = _CappedBody(url, "gzip", limit)
    inflated.feed(body)
    return inflated.body()


_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class _CappedBody:
    """Collects a body (inflating a Content-Encoding) and refuses it past ``limit`` bytes.

    Inflation is bounded per chunk (``max_length``), so the decoded bytes held in memory
    never exceed the limit, whatever the compression ratio.
    """

    def __init__(self, url: str, encoding: str, limit: int) -> None:
        self.url = url
        self.limit = limit
        self.total = 0
        self.chunks: list[bytes] = []
        enc = encoding.strip().lower()
        if enc in ("", "identity"):
            self.inflate: zlib._Decompress | None = None
        elif enc in _DECODERS:
            self.inflate = zlib.decompressobj(_DECODERS[enc])
        else:
            raise MalformedResponseError(f"{url}: unsupported Content-Encoding {encoding!r}")

    def _add(self, data: bytes) -> None:
        self.total += len(data)
        if self.total > self.limit:
            raise ResponseTooLargeError(f"{self.url}: body exceeds {self.limit} bytes")
        self.chunks.append(data)

    def feed(self, raw: bytes) -> None:
        if self.inflate is None:
            self._add(raw)
            return
        try:
            self._add(self.inflate.decompress(raw, self.limit - self.total + 1))
        except zlib.error as exc:
            raise MalformedResponseError(f"{self.url}: bad compressed body: {exc}") from exc
        if self.inflate.unconsumed_tail:  # output stopped at the cap
            raise ResponseTooLargeError(f"{self.url}: body expands beyond {self.limit} bytes")

    def body(self) -> bytes:
        return b"".join(self.chunks)


def new_http_client(retry: RetryPolicy) -> httpx.AsyncClient:
    """The HTTP client for CT logs.

    Building one loads the system CA bundle, ~90 ms of CPU here: a process that
    follows logs beside the OCSP port builds it once, in a thread
    (``await asyncio.to_thread(new_http_client, retry)``), and shares it.
    """
    return httpx.AsyncClient(
        timeout=retry.timeout,
        headers={"Accept-Encoding": "gzip, identity", "User-Agent": "ocsp-responder-ct/1"},
    )


class LogClient:
    """GETs below a log's base URL with retries and a body size bound."""

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.retry = retry or RetryPolicy()
        self.max_body = max_body
        self._own_http = http is None
        self.http = http or new_http_client(self.retry)

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def _once(
        self, url: str, params: dict[str, Any] | None, limit: int
    ) -> tuple[int, bytes, float | None]:
        async with (
            asyncio.timeout(self.retry.deadline),
            self.http.stream("GET", url, params=params) as resp,
        ):
            if resp.status_code != 200:
                return resp.status_code, b"", _retry_after(resp)
            body = _CappedBody(url, resp.headers.get("content-encoding", ""), limit)
            async for chunk in resp.aiter_raw():
                body.feed(chunk)
            return 200, body.body(), None

    async def get(
        self, path: str, params: dict[str, Any] | None = None, *, limit: int | None = None
    ) -> bytes:
        """GET ``path`` (body capped at ``limit``, default ``max_body``); retry transient
        failures and missed deadlines; 404 -> NotFoundError."""
        url = self.base_url + path
        cap = self.max_body if limit is None else min(limit, self.max_body)
        last = ""
        for attempt in range(self.retry.attempts):
            retry_after: float | None = None
            try:
                status, body, retry_after = await self._once(url, params, cap)
            except httpx.TransportError as exc:
                status, body, last = -1, b"", f"{type(exc).__name__}: {exc}"
            except TimeoutError:
                status, body = -1, b""
                last = f"no complete response within {self.retry.deadline:g}s"
            except httpx.DecodingError as exc:
                raise MalformedResponseError(f"{url}: undecodable body: {exc}") from exc
            if status == 200:
                return body
            if status == 404:
                raise NotFoundError(f"{url}: 404")
            if status != -1 and status not in RETRY_STATUSES:
                raise FetchError(f"{url}: HTTP {status}")
            if status != -1:
                last = f"HTTP {status}"
            if attempt + 1 < self.retry.attempts:
                await asyncio.sleep(self.retry.delay(attempt, retry_after))
        raise RetriesExhaustedError(
            f"{url}: giving up after {self.retry.attempts} attempts ({last})"
        )

    async def get_maybe_gzip(self, path: str, plain_sizes: tuple[int, ...] = ()) -> bytes:
        """GET a tile; a raw gzip body (magic 1f 8b) is inflated unless its size is plain."""
        body = await self.get(path)
        if body[:2] == GZIP_MAGIC and len(body) not in plain_sizes:
            return _gunzip(path, body, self.max_body)
        return body


class StaticCTClient(LogClient):
    """Static CT API (c2sp.org/static-ct-api) read path."""

    async def checkpoint(self) -> bytes:
        return await self.get("checkpoint", limit=MAX_SMALL_BODY)

    async def _tile(
        self, level: int | str, index: int, width: int, plain: tuple[int, ...] = ()
    ) -> tuple[bytes, bool]:
        """Fetch a tile of ``width``; a vanished partial falls back to the full tile.

        Returns (body, is_full). From a full tile stand-in only the first
        ``width`` entries may be used: the rest is not covered by the checkpoint.
        """
        if width == merkle.TILE_WIDTH:
            return await self.get_maybe_gzip(merkle.tile_path(level, index), plain), True
        try:
            return await self.get_maybe_gzip(merkle.tile_path(level, index, width), plain), False
        except NotFoundError:
            return await self.get_maybe_gzip(merkle.tile_path(level, index), plain), True

    async def issuer(self, fingerprint: bytes) -> bytes:
        """The chain certificate (DER) a tile names by SHA-256 ``fingerprint``.

        A body that does not hash to the fingerprint is the log lying about it.
        """
        body = await self.get("issuer/" + fingerprint.hex())
        if hashlib.sha256(body).digest() != fingerprint:
            raise MalformedResponseError(f"issuer/{fingerprint.hex()}: body has another hash")
        return body

    async def data_tile(self, index: int, width: int) -> tuple[bytes, bool]:
        """Data tile ``index`` holding at least ``width`` entries; (body, is_full)."""
        return await self._tile("data", index, width)

    async def hash_tile(self, level: int, index: int, width: int) -> list[bytes]:
        """The first ``width`` hashes of hash tile (level, index)."""
        full = merkle.TILE_WIDTH * merkle.HASH_SIZE
        plain = (width * merkle.HASH_SIZE, full)
        body, is_full = await self._tile(level, index, width, plain)
        if len(body) != (full if is_full else width * merkle.HASH_SIZE):
            raise MalformedResponseError(f"hash tile {level}/{index} has {len(body)} bytes")
        return merkle.split_hashes(body, width)


def _decode_entries(body: bytes, wanted: int) -> list[tuple[bytes, bytes]]:
    """(leaf_input, extra_data) of a get-entries page of at most ``wanted`` entries."""
    tokens = sum(body.count(c) for c in (b"{", b"[", b",", b":"))
    if tokens > wanted * ENTRY_TOKENS + PAGE_TOKEN_SLACK:
        raise MalformedResponseError(
            f"get-entries page for {wanted} entries has {tokens} JSON tokens: "
            "more entries than requested"
        )
    obj = _json(body)
    del body
    try:
        entries = obj["entries"]
        if not isinstance(entries, list):
            raise TypeError("entries is not a list")
        if len(entries) > wanted:
            raise MalformedResponseError(
                f"get-entries returned {len(entries)} entries for {wanted} requested"
            )
        return [
            (
                base64.b64decode(e["leaf_input"], validate=True),
                base64.b64decode(e.get("extra_data", ""), validate=True),
            )
            for e in entries
        ]
    except (KeyError, TypeError, binascii.Error) as exc:
        raise MalformedResponseError(f"bad get-entries response: {exc!r}") from exc


def _audit_path(obj: Any) -> list[bytes]:
    path = obj["audit_path"]
    if not isinstance(path, list):
        raise TypeError("audit_path is not a list")
    return [base64.b64decode(p, validate=True) for p in path]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise MalformedResponseError(f"invalid JSON: {exc}") from exc


class RFC6962Client(LogClient):
    """RFC 6962 ``/ct/v1/`` read path."""

    async def get_sth(self) -> bytes:
        return await self.get("ct/v1/get-sth", limit=MAX_SMALL_BODY)

    async def get_entries(self, start: int, end: int) -> list[tuple[bytes, bytes]]:
        """One get-entries call for [start, end] inclusive; may return fewer entries.

        A page with more entries than asked for is refused before it is decoded: a
        60 MiB page of a million tiny entries would otherwise cost gigabytes as Python
        objects. The structure characters bound every JSON value json.loads can make.
        """
        wanted = end - start + 1
        body = await self.get("ct/v1/get-entries", {"start": start, "end": end})
        # a 1,024-entry page is megabytes of JSON and base64: decoded in a thread, so
        # that a follower inside ``serve`` does not hold the OCSP event loop meanwhile
        return await asyncio.to_thread(_decode_entries, body, wanted)

    async def get_proof_by_hash(self, leaf_hash: bytes, tree_size: int) -> tuple[int, list[bytes]]:
        obj = _json(
            await self.get(
                "ct/v1/get-proof-by-hash",
                {"hash": base64.b64encode(leaf_hash).decode(), "tree_size": tree_size},
                limit=MAX_SMALL_BODY,
            )
        )
        try:
            index = obj["leaf_index"]
            path = _audit_path(obj)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise MalformedResponseError(f"bad get-proof-by-hash response: {exc!r}") from exc
        if not isinstance(index, int) or isinstance(index, bool):
            raise MalformedResponseError("leaf_index must be an integer")
        return index, path

    async def get_entry_and_proof(
        self, leaf_index: int, tree_size: int
    ) -> tuple[bytes, list[bytes]]:
        """(leaf_input, audit path) of the leaf at ``leaf_index`` (RFC 6962 4.8).

        The proof by index, for a leaf whose hash the log holds more than once:
        get-proof-by-hash proves one of the copies, not necessarily ours.
        """
        obj = _json(
            await self.get(
                "ct/v1/get-entry-and-proof",
                {"leaf_index": leaf_index, "tree_size": tree_size},
                limit=MAX_ENTRY_AND_PROOF_BODY,
            )
        )
        try:
            leaf_input = base64.b64decode(obj["leaf_input"], validate=True)
            path = _audit_path(obj)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise MalformedResponseError(f"bad get-entry-and-proof response: {exc!r}") from exc
        return leaf_input, path
