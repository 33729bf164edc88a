"""The native HTTP/1.1 server of the OCSP port (responder/ocsp_http.py), over real sockets.

The server runs in-process on loopback in front of a real ``ResponderService`` (real
PostgreSQL, real signer); the client is a raw socket, so that each HTTP/1.1 behaviour is
observed on the wire exactly: keep-alive, pipelining (answers in order, including one
that needs the database between two from memory), HTTP/1.0, ``Expect: 100-continue``,
chunked bodies, the size limits, unparseable input, ``Upgrade``, and both timeouts.
A hypothesis property then feeds mutated streams of such requests, cut at random points,
into the protocol (``OCSP_FUZZ_EXAMPLES``, default 200): only well-formed answers, never a
5xx, nothing written after the close.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from responder.config import load_config
from responder.ocsp_http import MAX_HEAD_BYTES, OCSPHttpProtocol, OCSPHttpServer
from responder.server import build_ocsp_endpoint
from responder.service import ResponderService
from tests.support import IssuerFiles, build_request, write_config


@dataclass
class Wire:
    loop: asyncio.AbstractEventLoop
    server: OCSPHttpServer
    port: int
    good: bytes  # DER request for a recorded certificate
    unknown: bytes  # DER request for a serial nobody issued (answered from the database)


@pytest.fixture(scope="module")
def wire(module_database: str, p256_issuer: IssuerFiles, workdir: Path) -> Iterator[Wire]:
    proc = write_config(workdir / "native-http", module_database, [p256_issuer])
    config = load_config(proc.config_path, {})
    loop = asyncio.new_event_loop()
    service = ResponderService(config)
    loop.run_until_complete(service.start(pool_size=4))
    cert = p256_issuer.ca.issue_leaf("native-http.test")
    loop.run_until_complete(service.recorder.record([cert]))
    server = OCSPHttpServer(
        build_ocsp_endpoint(service), keep_alive_timeout=1.0, request_timeout=1.0
    )
    loop.run_until_complete(server.start("127.0.0.1", 0))
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    yield Wire(
        loop,
        server,
        port,
        build_request(cert, p256_issuer.ca.ca_cert),
        build_request(None, p256_issuer.ca.ca_cert, serial=0x5EED),
    )
    loop.run_until_complete(server.close())
    loop.run_until_complete(service.close())
    loop.close()


class Answer:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def cert_status(self) -> Any:
        return ocsp.load_der_ocsp_response(self.body)


async def read_answer(reader: asyncio.StreamReader, *, head: bool = False) -> Answer:
    head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head_bytes.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    length = 0 if head or status in (100, 304) else int(headers.get(b"content-length", b"0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return Answer(status, headers, body)


def post(der: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (
        b"POST / HTTP/" + version + b"\r\nhost: ocsp.test\r\n"
        b"content-type: application/ocsp-request\r\n"
        b"content-length: %d\r\n" % len(der) + extra + b"\r\n" + der
    )


def get(der: bytes, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    path = base64.b64encode(der).replace(b"/", b"%2F").replace(b"+", b"%2B")
    return method + b" /" + path + b" HTTP/1.1\r\nhost: ocsp.test\r\n" + extra + b"\r\n"


def run(wire: Wire, coro: Any) -> Any:
    return wire.loop.run_until_complete(coro)


async def connect(wire: Wire) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", wire.port)


async def connect_not_reading(wire: Wire) -> tuple[asyncio.StreamWriter, OCSPHttpProtocol]:
    """A client connection with a tiny receive window (set before connecting, so that the
    kernel never advertises more), and the server's protocol for it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await wire.loop.sock_connect(sock, ("127.0.0.1", wire.port))
    _reader, writer = await asyncio.open_connection(sock=sock)
    await asyncio.sleep(0.01)  # accepted
    [server_side] = [
        c
        for c in wire.server.connections
        if c.transport is not None and c.transport.get_extra_info("peername") == sock.getsockname()
    ]
    return writer, server_side


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 5) == b""


def test_keep_alive_serves_many_requests_on_one_connection(wire: Wire) -> None:
    async def scenario() -> list[Answer]:
        reader, writer = await connect(wire)
        answers = []
        for request in (post(wire.good), get(wire.good), post(wire.good)):
            writer.write(request)
            answers.append(await read_answer(reader))
        writer.close()
        return answers

    answers = run(wire, scenario())
    assert [a.status for a in answers] == [200, 200, 200]
    for answer in answers:
        assert answer.headers[b"content-type"] == b"application/ocsp-response"
        assert b"connection" not in answer.headers
        assert answer.headers[b"date"].endswith(b" GMT")
        assert answer.cert_status().certificate_status == ocsp.OCSPCertStatus.GOOD


def test_pipelined_requests_are_answered_in_order(wire: Wire) -> None:
    """The middle request needs the database (unknown serial): the third, answerable from
    memory at once, must still come after it."""

    async def scenario() -> list[Answer]:
        reader, writer = await connect(wire)
        writer.write(get(wire.good) + post(wire.unknown) + get(wire.good, method=b"HEAD"))
        answers = [await read_answer(reader), await read_answer(reader)]
        answers.append(await read_answer(reader, head=True))
        writer.close()
        return answers

    first, second, third = run(wire, scenario())
    assert first.status == 200 and first.cert_status().response_status.name == "SUCCESSFUL"
    assert second.status == 200
    assert ocsp.load_der_ocsp_response(second.body).response_status.name == "UNAUTHORIZED"
    assert second.headers[b"cache-control"] == b"no-cache"
    assert third.status == 200 and third.body == b""
    assert third.headers[b"content-length"] == first.headers[b"content-length"]


def test_http10_closes_unless_keep_alive_asked(wire: Wire) -> None:
    async def scenario() -> tuple[Answer, bool, Answer]:
        reader, writer = await connect(wire)
        writer.write(post(wire.good, version=b"1.0"))
        plain = await read_answer(reader)
        closed = await closed_by_server(reader)
        reader, writer = await connect(wire)
        writer.write(post(wire.good, b"connection: keep-alive\r\n", version=b"1.0"))
        kept = await read_answer(reader)
        writer.write(post(wire.good, b"connection: keep-alive\r\n", version=b"1.0"))
        await read_answer(reader)
        writer.close()
        return plain, closed, kept

    plain, closed, kept = run(wire, scenario())
    assert plain.status == 200 and plain.headers[b"connection"] == b"close" and closed
    assert kept.status == 200 and kept.headers[b"connection"] == b"keep-alive"


def test_expect_continue_then_body(wire: Wire) -> None:
    async def scenario() -> tuple[Answer, Answer]:
        reader, writer = await connect(wire)
        whole = post(wire.good, b"expect: 100-continue\r\n")
        head, body = whole[: -len(wire.good)], wire.good
        writer.write(head)
        interim = await read_answer(reader)
        writer.write(body)
        final = await read_answer(reader)
        writer.close()
        return interim, final

    interim, final = run(wire, scenario())
    assert interim.status == 100
    assert final.status == 200
    assert final.cert_status().certificate_status == ocsp.OCSPCertStatus.GOOD


def test_expect_continue_from_http10_is_ignored(wire: Wire) -> None:
    """RFC 9110 10.1.1: an HTTP/1.0 client cannot parse a 1xx, so the expectation is
    ignored (it used to get "100 Continue", which it takes for the whole answer)."""

    async def scenario() -> Answer:
        reader, writer = await connect(wire)
        writer.write(post(wire.good, b"expect: 100-continue\r\n", version=b"1.0"))
        answer = await read_answer(reader)
        writer.close()
        return answer

    answer = run(wire, scenario())
    assert answer.status == 200
    assert answer.cert_status().certificate_status == ocsp.OCSPCertStatus.GOOD


def test_bytes_after_a_closing_request_are_ignored_not_refused(wire: Wire) -> None:
    """What a client sends after its ``Connection: close`` request (or HTTP/1.0 without
    keep-alive) is dropped with the connection: not counted and logged as a 400."""
    before = REGISTRY.get_sample_value("ocsp_http_refusals_total", {"status": "400"}) or 0.0

    async def scenario() -> tuple[list[Answer], bool]:
        answers = []
        for first in (
            post(wire.good, version=b"1.0"),
            get(wire.good, extra=b"connection: close\r\n"),
        ):
            reader, writer = await connect(wire)
            writer.write(first + get(wire.good))
            answers.append(await read_answer(reader))
            closed = await closed_by_server(reader)
            writer.close()
        return answers, closed

    answers, closed = run(wire, scenario())
    assert [a.status for a in answers] == [200, 200] and closed
    assert all(a.headers[b"connection"] == b"close" for a in answers)
    after = REGISTRY.get_sample_value("ocsp_http_refusals_total", {"status": "400"}) or 0.0
    assert after == before


def test_chunked_body_is_accepted(wire: Wire) -> None:
    async def scenario() -> Answer:
        reader, writer = await connect(wire)
        der = wire.good
        writer.write(
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/ocsp-request\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n" % 10
            + der[:10]
            + b"\r\n"
            + b"%x\r\n" % (len(der) - 10)
            + der[10:]
            + b"\r\n0\r\n\r\n"
        )
        answer = await read_answer(reader)
        writer.close()
        return answer

    answer = run(wire, scenario())
    assert answer.status == 200
    assert answer.cert_status().certificate_status == ocsp.OCSPCertStatus.GOOD


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # declared too large: refused before the body is sent
        (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 20000\r\n\r\n", 413),
        # chunked past the limit
        (
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            + (b"1000\r\n" + b"A" * 0x1000 + b"\r\n") * 3,
            413,
        ),
        (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: ten\r\n\r\n", 400),
        (b"GET /" + b"A" * (MAX_HEAD_BYTES + 10) + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nx: " + b"A" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n", 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", 400),
    ],
    ids=[
        "declared-too-large",
        "chunked-too-large",
        "bad-length",
        "long-url",
        "long-header",
        "tls-hello",
        "two-lengths",
    ],
)
def test_unusable_input_gets_a_4xx_and_the_connection_closes(
    wire: Wire, request_bytes: bytes, status: int
) -> None:
    labels = {"status": str(status)}
    before = REGISTRY.get_sample_value("ocsp_http_refusals_total", labels) or 0.0

    async def scenario() -> tuple[Answer, bool]:
        reader, writer = await connect(wire)
        writer.write(request_bytes)
        answer = await read_answer(reader)
        closed = await closed_by_server(reader)
        writer.close()
        return answer, closed

    answer, closed = run(wire, scenario())
    assert answer.status == status
    assert answer.headers[b"connection"] == b"close"
    assert answer.headers[b"content-type"].startswith(b"text/plain")
    assert closed
    # counted for the operator (ocsp_http_refusals_total), once
    assert REGISTRY.get_sample_value("ocsp_http_refusals_total", labels) == before + 1


def test_a_header_line_that_never_ends_is_refused_at_the_head_limit(wire: Wire) -> None:
    """httptools holds a header's value until its line ends: without a count of the bytes
    received inside the head, a never-ending header grew in memory (copied again on each
    chunk) until the request timeout, and got a 408 instead of the 431."""

    async def scenario() -> tuple[Answer, bool]:
        reader, writer = await connect(wire)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-filler: ")
        for _ in range(6):  # 96 KiB in chunks of their own, the line never ends
            await asyncio.sleep(0.02)
            if reader.at_eof():
                break
            with contextlib.suppress(ConnectionError):  # refused and closed meanwhile
                writer.write(b"A" * (MAX_HEAD_BYTES // 4))
                await writer.drain()
        answer = await read_answer(reader)
        closed = await closed_by_server(reader)
        writer.close()
        return answer, closed

    answer, closed = run(wire, scenario())
    assert answer.status == 431 and closed


def test_head_split_into_many_chunks_is_served(wire: Wire) -> None:
    """The count of head bytes received is no more than the head: a large head (well
    under the limit) that arrives a few bytes at a time is still served."""

    async def scenario() -> Answer:
        reader, writer = await connect(wire)
        request = get(wire.good, extra=b"x-filler: " + b"A" * (MAX_HEAD_BYTES - 4096) + b"\r\n")
        for at in range(0, len(request), 1000):
            writer.write(request[at : at + 1000])
            await asyncio.sleep(0)
        answer = await read_answer(reader)
        writer.close()
        return answer

    answer = run(wire, scenario())
    assert answer.status == 200
    assert answer.cert_status().certificate_status == ocsp.OCSPCertStatus.GOOD


def test_a_client_that_never_reads_stops_being_read(wire: Wire) -> None:
    """Back-pressure: once the server's write buffer is past its high-water mark, it reads
    no more requests until the client reads answers. Each answer from the database
    (unknown serial) used to resume reading even while writing was paused, so a client
    that sent requests and never read answers grew the server's buffer without bound."""
    burst = (post(wire.unknown) + get(wire.good) * 20) * 40  # ~170 KiB of answers

    async def scenario() -> int:
        writer, server_side = await connect_not_reading(wire)
        largest = 0
        for _ in range(30):  # never reads
            writer.write(burst)
            await asyncio.sleep(0.05)
            assert server_side.transport is not None
            largest = max(largest, server_side.transport.get_write_buffer_size())
        writer.transport.abort()
        return largest

    largest = run(wire, scenario())
    # the high-water mark (64 KiB) plus the answers to one read of requests (one read is
    # at most 256 KiB: ~0.5 MiB here); it was 20+ MiB after 1.5 s, and growing
    assert largest < 2 * 1024 * 1024, largest


def test_a_closed_connection_whose_client_never_reads_is_dropped(wire: Wire) -> None:
    """A closed connection waits for its write buffer to drain: when the client never
    reads (zero window), the server aborts it after the request timeout instead of
    keeping the connection and its buffered answers forever."""

    async def scenario() -> tuple[bool, bool]:
        writer, server_side = await connect_not_reading(wire)
        writer.write(get(wire.good) * 20000)  # never reads the answers
        # The request timeout (1 s here) closes it at the first sweep (once a second, at
        # a phase the tests before left) past that second: 1-2 s after the write, and
        # a look at a fixed 2 s came a few ms too early now and then. Closed, it keeps
        # its unsent answers for two more sweeps at least before the abort.
        for _ in range(100):
            if server_side.closing:
                break
            await asyncio.sleep(0.05)
        closing_with_answers_pending = server_side.closing and bool(
            server_side.transport and server_side.transport.get_write_buffer_size()
        )
        for _ in range(60):  # aborted a request timeout after a sweep saw it closing
            if server_side not in wire.server.connections:
                break
            await asyncio.sleep(0.1)
        dropped = server_side not in wire.server.connections
        writer.transport.abort()
        return closing_with_answers_pending, dropped

    closing_with_answers_pending, dropped = run(wire, scenario())
    assert closing_with_answers_pending and dropped


def test_upgrade_request_is_answered_then_closed(wire: Wire) -> None:
    async def scenario() -> tuple[Answer, bool]:
        reader, writer = await connect(wire)
        writer.write(
            get(wire.good, extra=b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n")
        )
        answer = await read_answer(reader)
        closed = await closed_by_server(reader)
        writer.close()
        return answer, closed

    answer, closed = run(wire, scenario())
    assert answer.status == 200 and answer.headers[b"connection"] == b"close"
    assert answer.cert_status().certificate_status == ocsp.OCSPCertStatus.GOOD
    assert closed


def test_slow_request_times_out_with_408(wire: Wire, caplog: pytest.LogCaptureFixture) -> None:
    before = REGISTRY.get_sample_value("ocsp_http_refusals_total", {"status": "408"}) or 0.0
    wire.server._refusal_logged_at = -1e9  # the once-a-minute log line is due
    wire.server._unlogged.clear()  # (what earlier tests held back)

    async def scenario() -> tuple[Answer, bool]:
        reader, writer = await connect(wire)
        writer.write(b"GET /abc HTTP/1.1\r\nhost: x\r\n")  # never finished
        answer = await read_answer(reader)
        closed = await closed_by_server(reader)
        writer.close()
        return answer, closed

    with caplog.at_level(logging.WARNING, logger="responder.ocsp_http"):
        answer, closed = run(wire, scenario())
    assert answer.status == 408 and closed
    assert REGISTRY.get_sample_value("ocsp_http_refusals_total", {"status": "408"}) == before + 1
    [line] = [r.getMessage() for r in caplog.records if "refused HTTP requests" in r.getMessage()]
    assert "1 x 408" in line and "127.0.0.1" in line


def test_refusals_are_logged_at_most_once_a_minute(
    wire: Wire, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of garbage is counted in full but logged as one line with the counts."""
    wire.server._refusal_logged_at = -1e9
    wire.server._unlogged.clear()

    async def garbage(times: int) -> None:
        for _ in range(times):
            reader, writer = await connect(wire)
            writer.write(b"\x16\x03\x01 not http\r\n\r\n")
            assert (await read_answer(reader)).status == 400
            writer.close()

    with caplog.at_level(logging.WARNING, logger="responder.ocsp_http"):
        run(wire, garbage(5))
    lines = [r.getMessage() for r in caplog.records if "refused HTTP requests" in r.getMessage()]
    assert len(lines) == 1 and "1 x 400" in lines[0]  # the first; the next 4 wait
    assert wire.server._unlogged == {400: 4}
    # once the interval has passed, the sweeper logs what was held back, with no new
    # refusal needed
    wire.server._refusal_logged_at = -1e9
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="responder.ocsp_http"):
        run(wire, asyncio.sleep(1.5))
    lines = [r.getMessage() for r in caplog.records if "refused HTTP requests" in r.getMessage()]
    assert len(lines) == 1 and "4 x 400" in lines[0] and not wire.server._unlogged


def test_idle_keep_alive_connection_is_closed(wire: Wire) -> None:
    async def scenario() -> tuple[Answer, bool, int]:
        reader, writer = await connect(wire)
        writer.write(get(wire.good))
        answer = await read_answer(reader)
        before = len(wire.server.connections)
        closed = await closed_by_server(reader)  # after ~1 s idle (fixture setting)
        writer.close()
        return answer, closed, before

    answer, closed, before = run(wire, scenario())
    assert answer.status == 200 and before >= 1 and closed


def test_empty_lines_do_not_keep_an_idle_connection_open(wire: Wire) -> None:
    """llhttp skips CRLFs before a request line; any bytes used to count as activity, so
    a client sending an empty line more often than the keep-alive timeout held a
    connection (a file descriptor) forever without ever sending a request."""

    async def scenario() -> bool:
        reader, writer = await connect(wire)
        for _ in range(15):  # 4.5 s; the keep-alive timeout is 1 s here
            if reader.at_eof():
                return True
            with contextlib.suppress(ConnectionError):
                writer.write(b"\r\n")
                await writer.drain()
            await asyncio.sleep(0.3)
        writer.close()
        return reader.at_eof()

    assert run(wire, scenario())


def test_absolute_form_target_and_query_string(wire: Wire) -> None:
    async def scenario() -> list[Answer]:
        reader, writer = await connect(wire)
        path = base64.b64encode(wire.good).replace(b"/", b"%2F").replace(b"+", b"%2B")
        answers = []
        for target in (b"http://ocsp.test/" + path, b"/" + path + b"?cache-buster=1"):
            writer.write(b"GET " + target + b" HTTP/1.1\r\nhost: ocsp.test\r\n\r\n")
            answers.append(await read_answer(reader))
        writer.close()
        return answers

    for answer in run(wire, scenario()):
        assert answer.status == 200
        assert answer.cert_status().certificate_status == ocsp.OCSPCertStatus.GOOD


def test_if_none_match_gets_304_without_body(wire: Wire) -> None:
    async def scenario() -> tuple[Answer, Answer]:
        reader, writer = await connect(wire)
        writer.write(get(wire.good))
        first = await read_answer(reader)
        writer.write(get(wire.good, extra=b"if-none-match: " + first.headers[b"etag"] + b"\r\n"))
        second = await read_answer(reader)
        writer.close()
        return first, second

    first, second = run(wire, scenario())
    assert first.status == 200 and second.status == 304
    assert second.body == b"" and second.headers[b"etag"] == first.headers[b"etag"]


# --- fuzzing the protocol: arbitrary bytes, arbitrary split points ---------------------


class RecordingTransport:
    """What the protocol wrote, and whether it closed (no socket: thousands of cases/s)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.written_after_close = False

    def write(self, data: bytes) -> None:
        if self.closed:
            self.written_after_close = True
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> None:
        return None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def split_answers(data: bytes) -> list[tuple[int, dict[bytes, bytes]]]:
    """Parse a byte stream of HTTP/1.1 answers; fails on anything malformed."""
    answers = []
    rest = bytes(data)
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"truncated answer head: {head[:80]!r}"
        lines = head.split(b"\r\n")
        version, status, _reason = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1"
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        code = int(status)
        length = int(headers.get(b"content-length", b"0"))
        # an answer to HEAD has content-length but no body: the next answer (or the end)
        # follows at once (no body here starts with "HTTP/": DER or a plain-text reason)
        headless = rest == b"" or rest.startswith(b"HTTP/1.1 ")
        if code not in (100, 304) and not headless:
            assert len(rest) >= length, "truncated body"
            rest = rest[length:]
        answers.append((code, headers))
    return answers


def _pieces(wire: Wire) -> list[bytes]:
    return [
        get(wire.good),
        get(wire.unknown),
        get(wire.good, method=b"HEAD"),
        post(wire.good),
        post(wire.unknown),
        post(wire.good, version=b"1.0"),
        post(wire.good, b"expect: 100-continue\r\n"),
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
        b"DELETE / HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n4\r\n\x30\x03\x02\x01\r\n0\r\n\r\n",
        b"GET /%%%zz HTTP/1.1\r\n\r\n",
    ]


@settings(
    max_examples=int(os.environ.get("OCSP_FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_byte_streams_get_well_formed_answers_or_a_close(
    wire: Wire, data: st.DataObject
) -> None:
    """Whatever arrives, in whatever chunks: every byte written is a well-formed HTTP/1.1
    answer, never a 5xx, nothing after the connection closed, and the protocol never raises."""
    pieces = _pieces(wire)
    stream = b"".join(data.draw(st.lists(st.sampled_from(pieces), min_size=1, max_size=5)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(0, 255)), max_size=3)
    )
    mutable = bytearray(stream)
    for at, value in flips:
        mutable[at] = value
    stream = bytes(mutable) + data.draw(st.binary(max_size=40))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))

    async def scenario() -> RecordingTransport:
        transport = RecordingTransport()
        protocol = OCSPHttpProtocol(wire.server)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        start = 0
        for cut in [*cuts, len(stream)]:
            if cut > start:
                protocol.data_received(stream[start:cut])
                start = cut
            await asyncio.sleep(0)
        for _ in range(200):  # let answers that need the database finish
            if protocol.task is None:
                break
            await asyncio.sleep(0.005)
        protocol.connection_lost(None)
        return transport

    transport = run(wire, scenario())
    assert not transport.written_after_close
    for code, _headers in split_answers(bytes(transport.data)):
        assert code < 500, code


def test_close_answers_a_request_still_arriving_and_ends_idle_connections(wire: Wire) -> None:
    """At SIGTERM close() waited only for answers being computed: a POST whose body was
    still arriving had its connection closed under it (the client saw it reset, mid-
    request). Now it is received and answered, with ``Connection: close``; an idle
    keep-alive connection is closed at once."""
    server = OCSPHttpServer(wire.server.endpoint, keep_alive_timeout=30.0, request_timeout=30.0)

    async def go() -> None:
        await server.start("127.0.0.1", 0)
        assert server._server is not None
        port = server._server.sockets[0].getsockname()[1]
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(post(wire.good))
        assert (await read_answer(idle_reader)).status == 200  # kept alive, now idle
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = post(wire.good)
        writer.write(request[:-20])  # the head and part of the body
        await asyncio.sleep(0.1)
        closing = asyncio.create_task(server.close(grace=5.0))
        assert await closed_by_server(idle_reader)
        writer.write(request[-20:])
        answer = await read_answer(reader)
        assert answer.status == 200 and answer.cert_status().certificate_status.name == "GOOD"
        assert answer.headers[b"connection"] == b"close"
        assert await closed_by_server(reader)
        await asyncio.wait_for(closing, 5)
        for w in (writer, idle_writer):
            w.close()

    try:
        run(wire, go())
    finally:
        run(wire, server.close())
