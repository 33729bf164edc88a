"""A test CT log that serves one set of entries as Static CT *and* RFC 6962.

Its Merkle code is a deliberately naive, independent transcription of RFC 6962
(recursive MTH and PATH) so that it can catch mistakes in
``responder.ct.merkle``. It signs its own checkpoints/STHs with an ECDSA P-256
key made at test time, and it has knobs for the faults a follower must survive.

Use from pytest via the ``fake_log``/``fake_server`` fixtures (tests/ct/conftest.py),
or directly::

    with FakeLogServer() as srv:
        srv.log = FakeLog()
        srv.log.add_fixture_tiles(FIXTURES / "navigli2025h2")
        srv.log.publish()
        url = srv.url
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "ct"
NAVIGLI = FIXTURES / "navigli2025h2"
ISSUERS = FIXTURES / "issuers"


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def u(n: int, width: int) -> bytes:
    return n.to_bytes(width, "big")


@dataclass
class FakeEntry:
    """One log entry in both encodings."""

    te: bytes  # TimestampedEntry (with leaf_index extension)
    tail: bytes  # what follows the TE in a TileLeaf (pre_certificate, fingerprints)
    extra_data: bytes  # RFC 6962 get-entries extra_data

    @property
    def tile_leaf(self) -> bytes:
        return self.te + self.tail

    @property
    def leaf_input(self) -> bytes:
        return b"\x00\x00" + self.te


def _split_fixture_tile(tile: bytes) -> list[tuple[bytes, bytes]]:
    """Independent minimal TileLeaf splitter: [(te, tail)]."""
    out = []
    p = 0
    while p < len(tile):
        s = p
        etype = int.from_bytes(tile[p + 8 : p + 10], "big")
        p += 10
        if etype == 1:
            p += 32
        p += 3 + int.from_bytes(tile[p : p + 3], "big")
        p += 2 + int.from_bytes(tile[p : p + 2], "big")
        te_end = p
        if etype == 1:
            p += 3 + int.from_bytes(tile[p : p + 3], "big")
        p += 2 + int.from_bytes(tile[p : p + 2], "big")
        out.append((tile[s:te_end], tile[te_end:p]))
    return out


class Twin(NamedTuple):
    """A test twin of a real issuer: its key hash, and the key that re-signs precerts."""

    key_hash: bytes
    key: Any  # private key of the twin CA


def resign_precert(precert: bytes, key: Any) -> bytes:
    """The same precertificate (every field kept) signed by ``key`` instead."""
    pre = x509.load_der_x509_certificate(precert)
    b = (
        x509.CertificateBuilder()
        .subject_name(pre.subject)
        .issuer_name(pre.issuer)
        .serial_number(pre.serial_number)
        .not_valid_before(pre.not_valid_before_utc)
        .not_valid_after(pre.not_valid_after_utc)
        .public_key(pre.public_key())
    )
    for ext in pre.extensions:
        b = b.add_extension(ext.value, ext.critical)
    return b.sign(key, pre.signature_hash_algorithm).public_bytes(serialization.Encoding.DER)


def _asn1_list(items: list[bytes]) -> bytes:
    body = b"".join(u(len(c), 3) + c for c in items)
    return u(len(body), 3) + body


@dataclass
class Faults:
    """Fault injection knobs (mutable while the server runs)."""

    max_page: int = 1000  # get-entries page size cap (short responses)
    empty_pages: int = 0  # next N get-entries calls return no entries
    failures: dict[str, list[int]] = field(default_factory=dict)  # path prefix -> statuses
    retry_after: str | None = "0"
    drop_partials: bool = True  # 404 a partial tile once the full tile exists
    gzip: str | None = None  # None | "header" (Content-Encoding) | "raw" (gzip body)
    bad_signature: bool = False
    tamper: set[int] = field(default_factory=set)  # entries served != entries hashed
    on_head: Callable[[], None] | None = None  # called after serving checkpoint/STH
    head_size: Any = None  # served as the checkpoint size line / STH tree_size (unsigned)
    head_padding: int = 0  # bytes of witness-like junk appended to the checkpoint
    extra_entries: int = 0  # get-entries pads its page with this many tiny bogus entries
    drip: float | None = None  # seconds between the bytes of every 200 body (slow drip)
    bomb_mib: int = 0  # tiles: a Content-Encoding gzip body inflating to this many MiB
    entry_and_proof: bool = True  # serve RFC 6962 get-entry-and-proof
    bad_hash_tiles: bool = False  # Static CT: flip a bit of every hash tile served


class FakeLog:
    def __init__(self, origin: str = "fake.ct.example/2025", *, rsa: bool = False) -> None:
        self.origin = origin
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.log_id = sha256(self.spki)
        self.entries: list[FakeEntry] = []
        self.leaf_hashes: list[bytes] = []
        self.published = 0
        self.faults = Faults()
        self.requests: list[str] = []
        #: (path, query) of every request, for the tests that look at parameters
        self.queries: list[tuple[str, dict[str, list[str]]]] = []
        self._memo: dict[tuple[int, int], bytes] = {}
        self._clock = 1_750_000_000_000
        #: chain certificates by SHA-256, served at /issuer/<hex> (Static CT)
        self.chain_certs: dict[bytes, bytes] = {}

    # --- content -------------------------------------------------------------

    def _append(self, te: bytes, tail: bytes, extra: bytes) -> int:
        self.entries.append(FakeEntry(te, tail, extra))
        self.leaf_hashes.append(sha256(b"\x00\x00\x00" + te))
        return len(self.entries) - 1

    def add_fixture_tiles(
        self,
        root: Path = NAVIGLI,
        tiles: int = 4,
        *,
        rekey: dict[bytes, Twin] | None = None,
    ) -> None:
        """Append the real navigli2025h2 entries (they must land at their own indexes).

        ``rekey`` maps a real issuer_key_hash to a test twin of the issuer: the same real
        entries (timestamps, TBSCertificates, serials) re-attributed to the twin, their
        precertificates re-signed by the twin's key (a follower checks that signature);
        the log computes and signs its own tree over them.
        """
        issuers = {sha256(c): c for c in _fixture_issuer_ders()}
        for k in range(tiles):
            for te, tail in _split_fixture_tile((root / "tile" / "data" / f"{k:03d}").read_bytes()):
                assert int.from_bytes(te[-5:], "big") == len(self.entries)
                pre_len = int.from_bytes(tail[:3], "big")
                pre = tail[3 : 3 + pre_len]
                fps = tail[3 + pre_len + 2 :]
                if rekey is not None and te[8:10] == b"\x00\x01":
                    twin = rekey[te[10:42]]
                    te = te[:10] + twin.key_hash + te[42:]
                    pre = resign_precert(pre, twin.key)
                    tail = u(len(pre), 3) + pre + u(len(fps), 2) + fps
                chain = [issuers.get(fps[i : i + 32], b"") for i in range(0, len(fps), 32)]
                self.chain_certs.update((sha256(c), c) for c in chain if c)
                extra = u(len(pre), 3) + pre + _asn1_list([c for c in chain if c])
                self._append(te, tail, extra)

    def _te(self, etype: int, signed_entry: bytes, ts: int | None) -> bytes:
        if ts is None:
            self._clock += 1000
            ts = self._clock
        ext = b"\x00" + u(5, 2) + u(len(self.entries), 5)
        return u(ts, 8) + u(etype, 2) + signed_entry + u(len(ext), 2) + ext

    def add_x509(self, cert: bytes, chain: list[bytes], ts: int | None = None) -> int:
        te = self._te(0, u(len(cert), 3) + cert, ts)
        fps = b"".join(sha256(c) for c in chain)
        self.chain_certs.update((sha256(c), c) for c in chain)
        return self._append(te, u(len(fps), 2) + fps, _asn1_list(chain))

    def add_precert(
        self,
        issuer_key_hash: bytes,
        tbs: bytes,
        precert: bytes,
        chain: list[bytes],
        ts: int | None = None,
    ) -> int:
        te = self._te(1, issuer_key_hash + u(len(tbs), 3) + tbs, ts)
        fps = b"".join(sha256(c) for c in chain)
        self.chain_certs.update((sha256(c), c) for c in chain)
        tail = u(len(precert), 3) + precert + u(len(fps), 2) + fps
        return self._append(te, tail, u(len(precert), 3) + precert + _asn1_list(chain))

    def publish(self, size: int | None = None) -> None:
        self.published = len(self.entries) if size is None else size

    # --- independent RFC 6962 tree ---------------------------------------------

    def mth(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 0:
            return sha256(b"")
        if n == 1:
            return self.leaf_hashes[lo]
        perfect = n & (n - 1) == 0 and lo % n == 0
        if perfect and (lo, hi) in self._memo:
            return self._memo[(lo, hi)]
        k = 1
        while k * 2 < n:
            k *= 2
        h = sha256(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi))
        if perfect:
            self._memo[(lo, hi)] = h
        return h

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n <= 1:
            return []
        k = 1
        while k * 2 < n:
            k *= 2
        if m < k:
            return [*self.path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self.path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def hash_tile(self, level: int, index: int, width: int) -> bytes:
        span = 256**level
        return b"".join(
            self.mth(j * span, (j + 1) * span) for j in range(index * 256, index * 256 + width)
        )

    # --- signing ----------------------------------------------------------------

    def _digitally_signed(self, ts: int, size: int, root: bytes) -> bytes:
        msg = b"\x00\x01" + u(ts, 8) + u(size, 8) + root
        sig = self.key.sign(msg, ec.ECDSA(hashes.SHA256()))
        if self.faults.bad_signature:
            sig = self.key.sign(msg + b"x", ec.ECDSA(hashes.SHA256()))
        return b"\x04\x03" + u(len(sig), 2) + sig

    def checkpoint(self) -> bytes:
        size = self.published
        root = self.mth(0, size)
        ts = int(time.time() * 1000)
        shown = size if self.faults.head_size is None else self.faults.head_size
        body = f"{self.origin}\n{shown}\n{base64.b64encode(root).decode()}\n"
        key_id = sha256(self.origin.encode() + b"\n\x05" + self.log_id)[:4]
        sig = key_id + u(ts, 8) + self._digitally_signed(ts, size, root)
        witness = b"\x01\x02\x03\x04" + bytes(64)  # an unknown cosigner: must be ignored
        lines = (
            f"\u2014 witness.example {base64.b64encode(witness).decode()}\n"
            * (1 + self.faults.head_padding // 100)
            + f"\u2014 {self.origin} {base64.b64encode(sig).decode()}\n"
        )
        return (body + "\n" + lines).encode()

    def sth(self) -> dict[str, Any]:
        size = self.published
        root = self.mth(0, size)
        ts = int(time.time() * 1000)
        return {
            "tree_size": size if self.faults.head_size is None else self.faults.head_size,
            "timestamp": ts,
            "sha256_root_hash": base64.b64encode(root).decode(),
            "tree_head_signature": base64.b64encode(
                self._digitally_signed(ts, size, root)
            ).decode(),
        }

    def served(self, i: int) -> FakeEntry:
        e = self.entries[i]
        if i not in self.faults.tamper:
            return e
        te = bytearray(e.te)
        te[60] ^= 0x01  # inside the certificate / TBSCertificate
        return FakeEntry(bytes(te), e.tail, e.extra_data)

    # --- HTTP ---------------------------------------------------------------------

    def route(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes, dict[str, str]]:
        f = self.faults
        for prefix, statuses in f.failures.items():
            if path.startswith(prefix) and statuses:
                status = statuses.pop(0)
                hdrs = {"retry-after": f.retry_after} if f.retry_after is not None else {}
                return status, b"busy", hdrs
        if path == "/checkpoint":
            body = self.checkpoint()
            if f.on_head:
                f.on_head()
            return 200, body, {}
        if path == "/ct/v1/get-sth":
            body = json.dumps(self.sth()).encode()
            if f.on_head:
                f.on_head()
            return 200, body, {}
        if path == "/ct/v1/get-entries":
            start, end = int(query["start"][0]), int(query["end"][0])
            if start > end or start >= len(self.entries):
                return 400, b"bad range", {}
            if f.empty_pages:
                f.empty_pages -= 1
                return 200, b'{"entries": []}', {}
            end = min(end, len(self.entries) - 1, start + f.max_page - 1)
            out = [
                {
                    "leaf_input": base64.b64encode(self.served(i).leaf_input).decode(),
                    "extra_data": base64.b64encode(self.served(i).extra_data).decode(),
                }
                for i in range(start, end + 1)
            ]
            out += [{"leaf_input": "AAAA", "extra_data": ""}] * f.extra_entries
            return 200, json.dumps({"entries": out}).encode(), {}
        if path == "/ct/v1/get-proof-by-hash":
            h = base64.b64decode(query["hash"][0])
            size = int(query["tree_size"][0])
            try:
                m = self.leaf_hashes.index(h, 0, size)
            except ValueError:
                return 404, b"not found", {}
            proof = [base64.b64encode(p).decode() for p in self.path(m, 0, size)]
            return 200, json.dumps({"leaf_index": m, "audit_path": proof}).encode(), {}
        if path == "/ct/v1/get-entry-and-proof" and f.entry_and_proof:
            m, size = int(query["leaf_index"][0]), int(query["tree_size"][0])
            if not 0 <= m < size <= self.published:
                return 400, b"bad leaf_index or tree_size", {}
            obj = {
                "leaf_input": base64.b64encode(self.served(m).leaf_input).decode(),
                "extra_data": base64.b64encode(self.served(m).extra_data).decode(),
                "audit_path": [base64.b64encode(p).decode() for p in self.path(m, 0, size)],
            }
            return 200, json.dumps(obj).encode(), {}
        if path.startswith("/tile/"):
            return self._tile(path[len("/tile/") :])
        if path.startswith("/issuer/"):
            try:
                cert = self.chain_certs.get(bytes.fromhex(path[len("/issuer/") :]))
            except ValueError:
                cert = None
            return (200, cert, {}) if cert is not None else (404, b"no such issuer", {})
        return 404, b"no such endpoint", {}

    def _tile(self, rest: str) -> tuple[int, bytes, dict[str, str]]:
        level_s, _, idx_s = rest.partition("/")
        width = 256
        if ".p/" in idx_s:
            idx_s, _, w = idx_s.partition(".p/")
            width = int(w)
            if not 1 <= width <= 255:
                return 400, b"bad width", {}
        parts = idx_s.split("/")
        if not all(p.startswith("x") for p in parts[:-1]) or parts[-1].startswith("x"):
            return 400, b"bad tile index", {}
        index = int("".join(p.lstrip("x") for p in parts))
        level = 0 if level_s == "data" else int(level_s)
        have = min(256, (len(self.entries) >> (8 * level)) - 256 * index)
        if have < width or have <= 0:
            return 404, b"tile not available", {}
        if width < 256 and have == 256 and self.faults.drop_partials:
            return 404, b"partial tile gone", {}
        if level_s == "data":
            body = b"".join(
                self.served(i).tile_leaf for i in range(256 * index, 256 * index + width)
            )
        else:
            body = self.hash_tile(level, index, width)
            if self.faults.bad_hash_tiles:
                body = bytes([body[0] ^ 1]) + body[1:]
        hdrs: dict[str, str] = {}
        if self.faults.bomb_mib:
            return 200, _gzip_zeros(self.faults.bomb_mib), {"content-encoding": "gzip"}
        if self.faults.gzip:
            body = gzip.compress(body)
            if self.faults.gzip == "header":
                hdrs["content-encoding"] = "gzip"
        return 200, body, hdrs


_BOMBS: dict[int, bytes] = {}


def _gzip_zeros(mib: int) -> bytes:
    """A gzip member inflating to ``mib`` MiB of zeros (about 1,000:1), made once."""
    if mib not in _BOMBS:
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        chunk = bytes(1 << 20)
        _BOMBS[mib] = b"".join([*(c.compress(chunk) for _ in range(mib)), c.flush()])
    return _BOMBS[mib]


def _fixture_issuer_ders() -> list[bytes]:
    from cryptography import x509

    return [
        x509.load_pem_x509_certificate(p.read_bytes()).public_bytes(serialization.Encoding.DER)
        for p in sorted(ISSUERS.glob("*.pem"))
    ]


class FakeLogServer:
    """Runs a real uvicorn on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(self, log: FakeLog | None = None) -> None:
        self.log = log or FakeLog()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        log = self.log
        path = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode())
        log.requests.append(path)
        log.queries.append((path, query))
        try:
            status, body, hdrs = log.route(path, query)
        except Exception as exc:  # a bug in the fake must show, not hang the client
            status, body, hdrs = 500, repr(exc).encode(), {}
        headers = [(b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in hdrs.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if status == 200 and log.faults.drip is not None:
            # One byte at a time, each within any per-read timeout, until the fault is
            # cleared (then the rest at once, so the server thread never lingers).
            while body and log.faults.drip is not None:
                await send({"type": "http.response.body", "body": body[:1], "more_body": True})
                body = body[1:]
                await asyncio.sleep(log.faults.drip)
        await send({"type": "http.response.body", "body": body})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeLogServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, interface="asgi3", log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake CT log server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeLogServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
