"""The follower over real HTTP (uvicorn on loopback) against the fake log, both API forms."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import pytest

from responder.ct import Batch, IssuerSet, LogConfig, LogFollower, ResumeState, RetryPolicy
from responder.ct import client as client_module
from responder.ct.client import MAX_SMALL_BODY, RFC6962Client
from responder.ct.errors import (
    InclusionProofError,
    LeafHashMismatchError,
    LogRollbackError,
    MalformedResponseError,
    NotFoundError,
    ResponseTooLargeError,
    ResumeStateError,
    RetriesExhaustedError,
    RootMismatchError,
    ShortResponseError,
    SignatureError,
    StartIndexError,
    VerificationError,
)
from responder.ct.leaf import Issuer

from .fakelog import ISSUERS, FakeEntry, FakeLog, FakeLogServer, _gzip_zeros, sha256, u
from .pki import DER, Pki, leaf

KINDS = ["static", "rfc6962"]
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, timeout=10)


def staging() -> IssuerSet:
    return IssuerSet(
        Issuer.from_certificate((ISSUERS / f).read_bytes())
        for f in ("e5-cross.pem", "e6-cross.pem", "r10.pem", "r11.pem")
    )


def config(srv: FakeLogServer, kind: str, issuers: IssuerSet, **kw: object) -> LogConfig:
    return LogConfig(
        url=srv.url,
        kind=kind,  # type: ignore[arg-type]
        public_key=srv.log.public_key_pem.decode(),
        issuers=issuers,
        origin=srv.log.origin,
        retry=kw.pop("retry", FAST),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


async def follow(cfg: LogConfig, state: object = None) -> tuple[list[Batch], LogFollower]:
    f = LogFollower(cfg, state)  # type: ignore[arg-type]
    try:
        batches = [b async for b in f.poll_once()]
    finally:
        await f.aclose()
    return batches, f


def serials(batches: Sequence[Batch]) -> list[tuple[bytes, int]]:
    return [(e.issuer_key_hash, e.serial) for b in batches for e in b.entries]


def check_contiguous(batches: Sequence[Batch], start: int = 0) -> None:
    for b in batches:
        assert b.start == start and b.end > b.start
        assert b.new_state.next_index == b.end
        start = b.end


@pytest.mark.parametrize("kind", KINDS)
async def test_fixture_log_yields_each_of_1024_serials_once(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    fixture_log.faults.max_page = 100  # RFC 6962: forces several short pages per batch
    batches, f = await follow(config(fake_server, kind, staging(), batch_size=300))
    got = serials(batches)
    assert len(got) == 1024 and len(set(got)) == 1024
    check_contiguous(batches)
    assert batches[-1].end == 1024 and all(b.tree_size == 1024 for b in batches)
    assert sorted(e.leaf_index for b in batches for e in b.entries) == list(range(1024))
    assert f.state.next_index == 1024 and f.state.head_size == 1024
    # A second poll finds nothing new and yields nothing.
    again, _ = await follow(config(fake_server, kind, staging()), f.state.to_json())
    assert again == []


@pytest.mark.parametrize("kind", KINDS)
async def test_resume_after_crash_has_no_gap_and_no_duplicate(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    cfg = config(fake_server, kind, staging(), batch_size=200)
    committed: list[tuple[bytes, int]] = []
    stored: str | None = None
    f = LogFollower(cfg, stored)
    async for b in f.poll_once():
        committed += serials([b])
        stored = b.new_state.to_json()  # "commit" entries + state together
        if b.end >= 400:
            break  # crash before the next batch
    await f.aclose()
    # Also resume from a state in the middle of a tile (static: 600 % 256 != 0).
    rest, f2 = await follow(cfg, stored)
    committed += serials(rest)
    assert rest[0].start == ResumeState.from_json(stored).next_index
    assert len(committed) == 1024 and len(set(committed)) == 1024
    assert f2.state.next_index == 1024


@pytest.mark.parametrize("kind", KINDS)
async def test_generated_log_x509_precert_and_precert_signing_ca(
    fake_server: FakeLogServer, fake_log: FakeLog, pki: Pki, kind: str
) -> None:
    log = fake_log
    want: set[tuple[str, int]] = set()
    for s in range(1, 301):
        which = s % 5
        if which == 0:  # our x509
            log.add_x509(leaf(pki.ca, s).public_bytes(DER), [pki.ca.der])
            want.add(("x509", s))
        elif which == 1:  # our precert, issued directly
            pre = leaf(pki.ca, s, precert=True)
            tbs = leaf(pki.ca, s).tbs_certificate_bytes
            log.add_precert(pki.ca.key_hash, tbs, pre.public_bytes(DER), [pki.ca.der])
            want.add(("precert", s))
        elif which == 2:  # via a precertificate signing CA: the log rewrote TBS and key hash
            pre = leaf(pki.precert_ca, s, precert=True)
            tbs = leaf(pki.ca, s).tbs_certificate_bytes
            log.add_precert(
                pki.ca.key_hash, tbs, pre.public_bytes(DER), [pki.precert_ca.der, pki.ca.der]
            )
            want.add(("precert", s))
        elif which == 3:  # someone else's
            log.add_x509(leaf(pki.other, s).public_bytes(DER), [pki.other.der])
            pre = leaf(pki.other, s + 10000, precert=True)
            log.add_precert(
                pki.other.key_hash,
                leaf(pki.other, s + 10000).tbs_certificate_bytes,
                pre.public_bytes(DER),
                [],
            )
        else:  # an impostor with our CA's Name but not its key
            log.add_x509(leaf(pki.impostor, s).public_bytes(DER), [pki.impostor.der])
    log.publish()
    issuers = IssuerSet([pki.ca.cert, pki.ca_cross.cert])
    batches, _ = await follow(config(fake_server, kind, issuers, batch_size=100))
    got = [(e.kind, e.serial) for b in batches for e in b.entries]
    assert len(got) == len(set(got)) and set(got) == want
    assert all(e.issuer_key_hash == pki.ca.key_hash for b in batches for e in b.entries)
    assert batches[-1].end == len(log.entries) and not any(b.malformed for b in batches)


@pytest.mark.parametrize("kind", KINDS)
async def test_log_growing_while_followed(
    fake_server: FakeLogServer, fake_log: FakeLog, pki: Pki, kind: str
) -> None:
    log = fake_log
    serial = iter(range(1, 10_000))

    def grow(n: int) -> None:
        for _ in range(n):
            s = next(serial)
            log.add_x509(leaf(pki.ca, s).public_bytes(DER), [pki.ca.der])

    grow(10)
    log.publish()
    cfg = config(fake_server, kind, IssuerSet([pki.ca.cert]), batch_size=64)
    b1, f = await follow(cfg)
    assert b1[-1].end == 10
    # The log has sequenced far more than it signed: tile 001 is already full, so
    # its partial forms (data and level 0, width 14) are gone and the follower
    # must fall back to the full tiles, using only their first 14 entries.
    grow(550)
    log.publish(270)

    def on_head() -> None:  # ...and it keeps growing while we follow it
        grow(5)
        log.publish()

    log.faults.on_head = on_head
    b2, f = await follow(cfg, f.state.to_json())
    assert b2[0].start == 10 and b2[-1].end == 270 and b2[-1].tree_size == 270
    if kind == "static":
        for path in ("/tile/data/001.p/14", "/tile/data/001", "/tile/0/001.p/14", "/tile/0/001"):
            assert path in log.requests
    log.faults.on_head = None
    b3, f = await follow(cfg, f.state.to_json())
    assert b3[0].start == 270 and b3[-1].end == 565
    got = serials(b1 + b2 + b3)
    assert len(got) == 565 and len(set(got)) == 565


@pytest.mark.parametrize("kind", KINDS)
async def test_bad_signature_is_refused(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    fixture_log.faults.bad_signature = True
    with pytest.raises(SignatureError):
        await follow(config(fake_server, kind, staging()))


async def test_wrong_key_or_origin_is_refused(
    fake_server: FakeLogServer, fixture_log: FakeLog
) -> None:
    other = FakeLog()
    cfg = config(fake_server, "static", staging())
    with pytest.raises(SignatureError):
        await follow(LogConfig(**{**cfg.__dict__, "public_key": other.public_key_pem}))
    with pytest.raises(SignatureError):
        await follow(LogConfig(**{**cfg.__dict__, "origin": "evil.example/log"}))


@pytest.mark.parametrize("kind", KINDS)
async def test_tampered_entry_is_never_indexed(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    fixture_log.faults.tamper = {700}
    cfg = config(fake_server, kind, staging(), batch_size=256)
    f = LogFollower(cfg)
    got: list[Batch] = []
    with pytest.raises(VerificationError) as exc:
        async for b in f.poll_once():
            got.append(b)
    await f.aclose()
    if kind == "static":
        assert isinstance(exc.value, LeafHashMismatchError) and exc.value.leaf_index == 700
    else:
        assert isinstance(exc.value, (InclusionProofError, RootMismatchError))
    # Everything before the bad tile/batch was yielded; nothing at or after it.
    assert got and got[-1].end <= 700
    assert all(e.leaf_index < 700 for b in got for e in b.entries)
    assert f.state.next_index == got[-1].end


async def test_rfc6962_duplicate_leaf_at_a_batch_end_is_proved_by_index(
    fake_server: FakeLogServer, fake_log: FakeLog, pki: Pki
) -> None:
    """An RFC 6962 log may hold one timestamped entry twice. get-proof-by-hash then
    proves the first copy, and a batch ending on the second copy was refused on every
    poll: the log was never followed past it, and what it logged later never indexed."""
    log = fake_log
    for s in range(1, 8):
        log.add_x509(leaf(pki.ca, s).public_bytes(DER), [pki.ca.der])
    # leaf 7 == leaf 2, both without the Static CT leaf_index extension (RFC 6962 only)
    cert = leaf(pki.ca, 3).public_bytes(DER)
    te = u(1_750_000_000_000, 8) + u(0, 2) + u(len(cert), 3) + cert + u(0, 2)
    first = log.entries[2]
    log.entries[2] = FakeEntry(te, first.tail, first.extra_data)
    log.leaf_hashes[2] = sha256(b"\x00\x00\x00" + te)
    log._append(te, first.tail, first.extra_data)
    for s in range(8, 20):
        log.add_x509(leaf(pki.ca, s).public_bytes(DER), [pki.ca.der])
    log.publish()
    cfg = config(fake_server, "rfc6962", IssuerSet([pki.ca.cert]), batch_size=8)

    log.faults.entry_and_proof = False  # a log without the endpoint: refused, as before
    with pytest.raises(InclusionProofError, match="leaf 7 duplicates leaf 2"):
        await follow(cfg)

    log.faults.entry_and_proof = True
    batches, f = await follow(cfg)
    check_contiguous(batches)
    assert batches[0].end == 8 and f.state.next_index == 20
    assert sorted(e.serial for b in batches for e in b.entries) == sorted([*range(1, 20), 3])
    assert "/ct/v1/get-entry-and-proof" in log.requests


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limits_and_server_errors_are_retried(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    fixture_log.faults.failures = {
        "/checkpoint": [503, 429],
        "/ct/v1/get-sth": [503, 429],
        "/tile/data/001": [429, 503],
        "/tile/1/": [500],
        "/ct/v1/get-entries": [429, 503, 502],
    }
    batches, _ = await follow(config(fake_server, kind, staging(), batch_size=512))
    assert len(serials(batches)) == 1024
    used = (
        ["/checkpoint", "/tile/data/001", "/tile/1/"]
        if kind == "static"
        else [
            "/ct/v1/get-sth",
            "/ct/v1/get-entries",
        ]
    )
    assert all(fixture_log.faults.failures[p] == [] for p in used)  # every fault was hit


async def test_retry_after_is_respected(fake_server: FakeLogServer, fixture_log: FakeLog) -> None:
    fixture_log.faults.failures = {"/checkpoint": [429]}
    fixture_log.faults.retry_after = "1"
    t0 = time.monotonic()
    slow = RetryPolicy(attempts=3, base_delay=0.01, max_delay=5, timeout=10)
    batches, _ = await follow(config(fake_server, "static", staging(), retry=slow))
    assert time.monotonic() - t0 >= 0.95
    assert batches[-1].end == 1024


@pytest.mark.parametrize("kind", KINDS)
async def test_persistent_errors_exhaust_retries(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    fixture_log.faults.failures = {"/": [503] * 10}
    with pytest.raises(RetriesExhaustedError):
        await follow(config(fake_server, kind, staging()))


async def test_empty_get_entries_pages(fake_server: FakeLogServer, fixture_log: FakeLog) -> None:
    fixture_log.faults.empty_pages = 2
    batches, _ = await follow(config(fake_server, "rfc6962", staging()))
    assert len(serials(batches)) == 1024
    fixture_log.faults.empty_pages = 100
    with pytest.raises(ShortResponseError):
        await follow(config(fake_server, "rfc6962", staging()))


async def test_start_index_jump_tolerates_empty_get_entries_pages(
    fake_server: FakeLogServer, fixture_log: FakeLog
) -> None:
    """The jump's one get-entries call (leaf N-1) has the tolerance every other one has
    (docs/ct-index.md: retried ``empty_page_retries`` times): it failed the poll at once."""
    fixture_log.faults.empty_pages = 2
    cfg = config(fake_server, "rfc6962", staging(), start_index=1000)
    batches, f = await follow(cfg)
    assert batches[0].skipped and f.state.next_index == 1024
    fixture_log.faults.empty_pages = 100
    with pytest.raises(ShortResponseError):
        await follow(cfg)


@pytest.mark.parametrize("mode", ["header", "raw"])
async def test_gzip_tiles(fake_server: FakeLogServer, fixture_log: FakeLog, mode: str) -> None:
    fixture_log.faults.gzip = mode
    fixture_log.publish(1000)  # partial tiles (003.p/232, 0/003.p/232) gzip too
    fixture_log.faults.drop_partials = False
    batches, _ = await follow(config(fake_server, "static", staging()))
    assert len(serials(batches)) == 1000


@pytest.mark.parametrize("kind", KINDS)
async def test_rollback_and_foreign_state_are_refused(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    cfg = config(fake_server, kind, staging())
    _, f = await follow(cfg)
    fixture_log.publish(900)  # the log now signs a smaller tree
    with pytest.raises(LogRollbackError):
        await follow(cfg, f.state.to_json())
    other = FakeLog()
    with pytest.raises(ResumeStateError):
        LogFollower(LogConfig(**{**cfg.__dict__, "public_key": other.public_key_pem}), f.state)


def forked(log: FakeLog, pki: Pki, *, kept: int, then: int) -> FakeLog:
    """A split view of ``log``: its key, its first ``kept`` fixture leaves, then ``then``
    other leaves, published."""
    fork = FakeLog()
    fork.key, fork.spki, fork.log_id = log.key, log.spki, log.log_id
    fork.public_key_pem = log.public_key_pem
    fork.add_fixture_tiles(tiles=(kept + 255) // 256)
    fork.entries, fork.leaf_hashes = fork.entries[:kept], fork.leaf_hashes[:kept]
    for s in range(then):
        fork.add_x509(leaf(pki.other, s + 1).public_bytes(DER), [])
    fork.publish()
    return fork


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("start", [1, 600, 1024])
async def test_start_index_jumps_to_a_verified_frontier(
    fake_server: FakeLogServer, fixture_log: FakeLog, pki: Pki, kind: str, start: int
) -> None:
    """A follower below ``start_index`` jumps there without reading the older leaves; the
    frontier it takes from the log is the one reading everything gives, so the log's
    growth afterwards verifies as usual."""
    cfg = config(fake_server, kind, staging(), batch_size=300, start_index=start)
    batches, f = await follow(cfg)
    jump, rest = batches[0], batches[1:]
    assert jump.skipped and (jump.start, jump.end) == (0, start)
    assert jump.entries == [] and jump.scanned == 0 and jump.new_state.next_index == start
    check_contiguous(rest, start)
    assert sorted(e.leaf_index for b in rest for e in b.entries) == list(range(start, 1024))
    if kind == "static" and start >= 512:
        assert not any(
            p.startswith(("/tile/data/000", "/tile/data/001")) for p in fixture_log.requests
        )
    if kind == "rfc6962":  # one entry before start_index (its audit path gives the frontier)
        firsts = [int(q["start"][0]) for p, q in fixture_log.queries if p.endswith("get-entries")]
        assert min(firsts) == start - 1
    _, everything = await follow(config(fake_server, kind, staging()))

    def position(st: ResumeState) -> tuple[object, ...]:
        return st.next_index, st.frontier, st.head_size, st.head_root

    assert position(f.state) == position(everything.state)
    # growth after the jump verifies against the next head, from the jumped state
    fixture_log.add_x509(leaf(pki.other, 5).public_bytes(DER), [])
    fixture_log.add_x509(leaf(pki.other, 6).public_bytes(DER), [])
    fixture_log.publish()
    more, g = await follow(cfg, f.state.to_json())
    assert [(b.start, b.end, b.skipped) for b in more] == [(1024, 1026, False)]
    # a position at or past start_index does not jump again
    assert g.state.next_index == 1026


@pytest.mark.parametrize("kind", KINDS)
async def test_start_index_refusals_keep_the_position(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    cfg = config(fake_server, kind, staging(), start_index=1025)
    f = LogFollower(cfg)
    with pytest.raises(StartIndexError, match="beyond the log's signed tree size 1024"):
        _ = [b async for b in f.poll_once()]
    assert f.state.next_index == 0
    await f.aclose()
    # a frontier from the log that does not hash to the signed root is not taken
    cfg = config(fake_server, kind, staging(), start_index=600)
    if kind == "static":
        fixture_log.faults.bad_hash_tiles = True
        expected: type[Exception] = RootMismatchError
    else:
        fixture_log.faults.tamper = {599}  # leaf 599 served != leaf 599 hashed
        expected = NotFoundError  # the log has no proof for the served leaf
    f = LogFollower(cfg)
    with pytest.raises(expected):
        _ = [b async for b in f.poll_once()]
    assert f.state.next_index == 0
    await f.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_start_index_jump_still_detects_a_forked_log(
    fake_server: FakeLogServer, fixture_log: FakeLog, pki: Pki, kind: str
) -> None:
    """A follower with a position that jumps (start_index raised while it was in a
    backlog) must still check that the log's tree extends the one it verified: the jump
    took the whole frontier from the log and dropped the stored one, so a log that
    rewrote the leaves already indexed (a split view) was followed on from there."""
    fixture_log.publish(300)
    _, f = await follow(config(fake_server, kind, staging()))
    assert f.state.next_index == 300
    fake_server.log = forked(fixture_log, pki, kept=200, then=600)
    with pytest.raises(VerificationError):
        await follow(config(fake_server, kind, staging(), start_index=700), f.state.to_json())
    # the same jump from a position the log does extend is taken
    fake_server.log = fixture_log
    fixture_log.publish()
    more, g = await follow(config(fake_server, kind, staging(), start_index=700), f.state)
    assert (more[0].skipped, more[0].start, more[0].end) == (True, 300, 700)
    assert g.state.next_index == 1024


@pytest.mark.parametrize("kind", KINDS)
async def test_forked_log_is_detected(
    fake_server: FakeLogServer, fixture_log: FakeLog, pki: Pki, kind: str
) -> None:
    """A state from one history does not verify against another history's head."""
    cfg = config(fake_server, kind, staging())
    fixture_log.publish(600)
    _, f = await follow(cfg)
    # Same key, different entries after 500: a split view.
    fake_server.log = forked(fixture_log, pki, kept=500, then=300)
    with pytest.raises(VerificationError):
        await follow(cfg, f.state.to_json())


@pytest.mark.parametrize("kind", KINDS)
async def test_slow_drip_hits_the_overall_deadline(
    fake_server: FakeLogServer, fixture_log: FakeLog, kind: str
) -> None:
    """httpx's timeout is per read: a head dripped a byte every 0.05 s never tripped a
    1 s timeout. The per-attempt deadline turns it into a retried, then failed, fetch."""
    fixture_log.faults.drip = 0.05  # a ~300-byte head: ~15 s per attempt
    drip = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05, timeout=1, total_timeout=1)
    t0 = time.monotonic()
    try:
        with pytest.raises(RetriesExhaustedError, match="within 1s"):
            await asyncio.wait_for(follow(config(fake_server, kind, staging(), retry=drip)), 10)
    finally:
        fixture_log.faults.drip = None
    assert time.monotonic() - t0 < 5


async def test_checkpoint_has_its_own_small_body_cap(
    fake_server: FakeLogServer, fixture_log: FakeLog
) -> None:
    """A checkpoint was read up to max_body (64 MiB) before the 64 KiB note limit."""
    fixture_log.faults.head_padding = 2 * MAX_SMALL_BODY
    with pytest.raises(ResponseTooLargeError, match=str(MAX_SMALL_BODY)):
        await follow(config(fake_server, "static", staging()))


async def test_gzip_bomb_is_refused_while_streaming(
    fake_server: FakeLogServer, fixture_log: FakeLog
) -> None:
    """Content-Encoding gzip is inflated in bounded steps: no decoded chunk (and so no
    allocation) much beyond max_body, where httpx inflated each read whole."""
    fixture_log.faults.bomb_mib = 64
    _gzip_zeros(64)  # made before tracing
    tracemalloc.start()
    try:
        with pytest.raises(ResponseTooLargeError):
            await follow(config(fake_server, "static", staging(), max_body=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


async def test_get_entries_with_more_entries_than_asked_is_refused_undecoded(
    fake_server: FakeLogServer, fixture_log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 6962 allows fewer entries, never more. A page padded with a million tiny
    entries was decoded whole (~0.5 GiB) before the follower cut it to the request."""
    client = RFC6962Client(fake_server.url, retry=FAST)
    decoded: list[int] = []
    real = client_module._json

    def counting_json(body: bytes) -> Any:
        obj = real(body)
        decoded.append(len(obj["entries"]))
        return obj

    monkeypatch.setattr(client_module, "_json", counting_json)
    try:
        fixture_log.faults.extra_entries = 100_000
        with pytest.raises(MalformedResponseError, match="more entries than requested"):
            await client.get_entries(0, 0)
        assert decoded == []  # refused before the JSON was decoded
        fixture_log.faults.extra_entries = 1
        with pytest.raises(MalformedResponseError, match="2 entries for 1 requested"):
            await client.get_entries(0, 0)
        fixture_log.faults.extra_entries = 0
        assert len(await client.get_entries(0, 9)) == 10
        assert decoded == [2, 10]
    finally:
        await client.aclose()


async def test_static_forged_precerts_with_made_up_chains_are_suspicious_and_fetches_bounded(
    fake_server: FakeLogServer, fake_log: FakeLog, pki: Pki
) -> None:
    """Precerts naming our key hash but signed by another CA, each with a different
    made-up chain certificate: none indexed, all reported as suspicious, and the /issuer/
    fetches they cause are bounded per poll; a genuine signing CA's precert still counts."""
    log = fake_log
    pre = leaf(pki.precert_ca, 1, precert=True)
    tbs = leaf(pki.ca, 1).tbs_certificate_bytes
    log.add_precert(pki.ca.key_hash, tbs, pre.public_bytes(DER), [pki.precert_ca.der])
    for s in range(2, 102):
        forged = leaf(pki.other, s, precert=True).public_bytes(DER)
        tbs = leaf(pki.other, s).tbs_certificate_bytes
        log.add_precert(pki.ca.key_hash, tbs, forged, [b"junk %d" % s])
    log.publish()
    batches, _ = await follow(config(fake_server, "static", IssuerSet([pki.ca.cert])))
    assert [(e.kind, e.serial) for b in batches for e in b.entries] == [("precert", 1)]
    suspicious = [x for b in batches for x in b.suspicious]
    assert [x.leaf_index for x in suspicious] == list(range(1, 101))
    assert all(x.issuer_key_hash == pki.ca.key_hash for x in suspicious)
    assert 1 < sum(p.startswith("/issuer/") for p in log.requests) <= 65
