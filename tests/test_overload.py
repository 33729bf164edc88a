"""Overload: on-demand signing is bounded; excess answers tryLater at once, never a 5xx."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from pathlib import Path

import httpx
import pytest

from responder.protocol import TRY_LATER
from responder.store import serial_key
from tests.support import (
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    sql_sync,
    write_config,
)


def known_serials(dsn: str, issuer: str, count: int) -> list[int]:
    """Serials the store knows (as from CT) without a stored response: signed on demand."""
    serials = [secrets.randbits(120) | (1 << 119) for _ in range(count)]
    issuer_id = sql_sync(dsn, "SELECT id FROM issuers WHERE name = $1", issuer)[0]["id"]
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=90)
    for serial in serials:
        sql_sync(
            dsn,
            "INSERT INTO certificates (issuer_id, serial, not_after, kinds) VALUES ($1, $2, $3, 2)",
            issuer_id,
            serial_key(serial),
            not_after,
        )
    return serials


@pytest.fixture
def tight(database: str, rsa_issuer: IssuerFiles, tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = write_config(
        tmp_path, database, [rsa_issuer], extra="signing_concurrency = 1\nsigning_queue_limit = 1"
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


async def fire(url: str, ders: list[bytes]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(ders))
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(
                client.post(url, content=d, headers={"Content-Type": "application/ocsp-request"})
                for d in ders
            )
        )


def test_concurrent_on_demand_requests_get_try_later_not_5xx(
    tight: ResponderProcess, rsa_issuer: IssuerFiles, database: str
) -> None:
    serials = known_serials(database, "rsa", 40)
    ders = [build_request(None, rsa_issuer.ca.ca_cert, serial=s, alg="sha256") for s in serials]
    responses = asyncio.run(fire(tight.url + "/", ders))
    statuses = {r.status_code for r in responses}
    assert statuses == {200}
    try_later = [r for r in responses if r.content == TRY_LATER]
    signed = [(s, r) for s, r in zip(serials, responses, strict=True) if r.content != TRY_LATER]
    assert try_later, "40 concurrent signatures with one slot and a queue of one: some must wait"
    assert signed, "the one slot must still sign"
    for serial, r in signed:
        check_response(r.content, issuer=rsa_issuer, serial=serial, alg="sha256")
    assert all(r.headers["cache-control"] == "no-cache" for r in try_later)
    # once the burst is over, the same requests are answered
    again = asyncio.run(fire(tight.url + "/", [ders[0]]))[0]
    check_response(again.content, issuer=rsa_issuer, serial=serials[0], alg="sha256")


def test_no_queue_refuses_signing_but_serves_presigned(
    database: str, rsa_issuer: IssuerFiles, tmp_path: Path
) -> None:
    proc = write_config(
        tmp_path, database, [rsa_issuer], extra="signing_concurrency = 1\nsigning_queue_limit = 0"
    ).start()
    try:
        cert = rsa_issuer.ca.issue_leaf("presigned.test")
        assert proc.record(cert).status_code == 201
        resp = httpx.get(get_url(proc.url, build_request(cert, rsa_issuer.ca.ca_cert)))
        check_response(resp.content, issuer=rsa_issuer, serial=cert.serial_number)
        [serial] = known_serials(database, "rsa", 1)
        der = build_request(None, rsa_issuer.ca.ca_cert, serial=serial)
        resp = httpx.get(get_url(proc.url, der))
        assert (resp.status_code, resp.content) == (200, TRY_LATER)
    finally:
        proc.stop()
