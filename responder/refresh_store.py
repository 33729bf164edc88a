"""The refresher's SQL: claiming due responses, writing re-signed ones, sampling freshness.

Kept apart from ``store.py`` (the serving and recording path) because its queries are
about time windows rather than single rows. Every claim is one short transaction:
``SELECT ... FOR UPDATE OF r SKIP LOCKED`` picks rows nobody else is refreshing right now,
the caller signs them, the UPDATE writes them back, COMMIT releases the locks. Several
refreshers (one per ``serve`` instance, plus ``ocsp-responder refresh``) therefore never
sign the same row twice at once, and a crash mid-batch only rolls back that batch.

When a row is due (all in SQL, mirroring ``signer.response_builder.renewal_point``):
a response with the configured validity renews ``refresh_margin`` before nextUpdate; one
whose nextUpdate was capped by an expiring signer certificate renews at its own BR 4.9.9
deadline. Each row is claimed ``spread * (0.25 .. 1.0)`` before that point, the fraction
taken from the serial's last byte (serials are random), so rows signed in the same second
(a bulk import, a rollover) come due spread over ``spread`` instead of all at once.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from responder.store import serial_from_key, serial_key, to_datetime
from signer.response_builder import (
    REASONS_BY_CODE,
    CertStatus,
    Revocation,
    SignedResponse,
    ValidityPolicy,
)

#: A serial revoked without any certificate record has no known notAfter; its certificate
#: was issued before the revocation and lives at most 398 days (BR 6.3.2), so it has
#: certainly expired 398 days after the revocation time.
MAX_CERTIFICATE_LIFETIME = dt.timedelta(days=398)


def _numbered(template: str, names: Sequence[str]) -> str:
    """Turn ``:name`` placeholders into asyncpg's ``$n``, in the order of ``names``: the
    fragments below are shared by several queries that take different parameters."""
    for index, name in enumerate(names, start=1):
        template = template.replace(f":{name}", f"${index}")
    if re.search(r":[a-z_]+\b(?!:)", template.replace("::", "")):
        raise AssertionError(f"unbound placeholder in {template}")
    return template


_BR_DEADLINE = """
    (CASE WHEN r.next_update - r.this_update >= interval '16 hours'
          THEN least(r.next_update - interval '8 hours', r.this_update + interval '4 days')
          ELSE r.this_update + (r.next_update - r.this_update) / 2 END)"""

_RENEWAL_POINT = f"""
    (CASE WHEN r.next_update - r.this_update >= :validity::interval
          THEN r.next_update - :margin::interval
          ELSE {_BR_DEADLINE} END)"""

_JITTER = ":spread::interval * (0.25 + 0.75 * get_byte(r.serial, length(r.serial) - 1) / 255.0)"

#: True while the certificate is in the refresh cycle: not expired longer than the
#: retention (no known notAfter and not revoked: kept)
_IN_CYCLE = """
    coalesce(c.not_after, v.revoked_at + :lifetime::interval, 'infinity'::timestamptz)
        + :retention::interval > :now::timestamptz"""

_JOINS = """
    FROM responses r
    LEFT JOIN certificates c ON c.issuer_id = r.issuer_id AND c.serial = r.serial
    LEFT JOIN revocations v ON v.issuer_id = r.issuer_id AND v.serial = r.serial"""

_COLUMNS = "r.serial, r.status, r.this_update, r.next_update, v.revoked_at, v.reason"

_DUE_WHERE = f"""
    WHERE r.issuer_id = :issuer
      AND r.next_update <= :now::timestamptz + :margin::interval + :spread::interval
      AND {_RENEWAL_POINT} - {_JITTER} <= :now::timestamptz
      AND {_IN_CYCLE}"""

#: :stale: fingerprints of this issuer's responders that are no longer the active one
_STALE_WHERE = f"""
    WHERE r.issuer_id = :issuer
      AND (r.signer = ANY(:stale::bigint[]) OR r.signer IS NULL)
      AND r.next_update > :now::timestamptz
      AND {_IN_CYCLE}"""

_WINDOW = ("issuer", "now", "margin", "spread", "validity", "retention", "lifetime")

_CLAIM_DUE = _numbered(
    f"SELECT {_COLUMNS} {_JOINS} {_DUE_WHERE} "
    "ORDER BY r.next_update LIMIT :limit FOR UPDATE OF r SKIP LOCKED",
    (*_WINDOW, "limit"),
)
_CLAIM_STALE_SIGNER = _numbered(
    f"SELECT {_COLUMNS} {_JOINS} {_STALE_WHERE} LIMIT :limit FOR UPDATE OF r SKIP LOCKED",
    ("issuer", "now", "retention", "lifetime", "limit", "stale"),
)
_COUNT_DUE = _numbered(f"SELECT count(*) {_JOINS} {_DUE_WHERE}", _WINDOW)
_COUNT_STALE_SIGNER = _numbered(
    f"SELECT count(*) {_JOINS} {_STALE_WHERE}", ("issuer", "now", "retention", "lifetime", "stale")
)
#: BR 4.9.9 deadline passed (the candidate bound holds because the deadline is never
#: earlier than nextUpdate - refresh_margin, see signer.response_builder.renewal_point)
_COUNT_PAST_DEADLINE = _numbered(
    f"SELECT count(*) {_JOINS} WHERE r.next_update <= :now::timestamptz + :margin::interval "
    f"AND {_BR_DEADLINE} < :now::timestamptz AND {_IN_CYCLE}",
    ("now", "margin", "retention", "lifetime"),
)
_AGE_QUANTILES = _numbered(
    "SELECT percentile_disc(ARRAY[0.5, 0.9, 0.99, 1.0]::float8[]) "
    "       WITHIN GROUP (ORDER BY extract(epoch FROM :now::timestamptz - r.this_update)) "
    "FROM responses r TABLESAMPLE SYSTEM (:percent::float8) "
    "LEFT JOIN certificates c ON c.issuer_id = r.issuer_id AND c.serial = r.serial "
    "LEFT JOIN revocations v ON v.issuer_id = r.issuer_id AND v.serial = r.serial "
    f"WHERE {_IN_CYCLE}",
    ("now", "percent", "retention", "lifetime"),
)

_WRITE = """
    UPDATE responses r
    SET status = u.status, this_update = u.this_update, next_update = u.next_update,
        der = u.der, signer = u.signer
    FROM unnest($2::bytea[], $3::smallint[], $4::timestamptz[], $5::timestamptz[],
                $6::bytea[], $7::bigint[])
         AS u(serial, status, this_update, next_update, der, signer)
    WHERE r.issuer_id = $1 AND r.serial = u.serial
      AND NOT (r.status = 1 AND u.status = 0)"""

#: rows the age sample aims at: enough for a 0.99 quantile, cheap on a large table
AGE_SAMPLE_ROWS = 20_000

AGE_QUANTILES = ("0.5", "0.9", "0.99", "1")


@dataclass(frozen=True, slots=True)
class DueResponse:
    """A stored response claimed for re-signing, with what decides its new status."""

    serial: int
    status: CertStatus
    this_update: int
    next_update: int
    revocation: Revocation | None


@dataclass(frozen=True, slots=True)
class Window:
    """The time parameters every refresher query shares."""

    now: dt.datetime
    policy: ValidityPolicy
    spread: dt.timedelta
    retention: dt.timedelta

    def args(self, issuer_id: int) -> list[object]:
        """Values for the ``_WINDOW`` parameters, in order."""
        return [
            issuer_id,
            self.now,
            self.policy.refresh_margin,
            self.spread,
            self.policy.validity,
            self.retention,
            MAX_CERTIFICATE_LIFETIME,
        ]


@dataclass(frozen=True, slots=True)
class Freshness:
    """What the periodic sampler exports (see responder/metrics.py)."""

    backlog: int
    past_deadline: int
    age_quantiles: dict[str, float]


#: signs the claimed rows (in a worker thread); None for a row it must leave alone
BatchSigner = Callable[[list[DueResponse]], Awaitable[list[SignedResponse | None]]]


class RefreshStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def refresh_batch(
        self,
        issuer_id: int,
        window: Window,
        limit: int,
        sign: BatchSigner,
        *,
        stale_signers: Sequence[int] | None = None,
    ) -> int:
        """Claim up to ``limit`` due rows (or, with ``stale_signers``, rows signed by a
        retired responder), sign them, write them back; one transaction. Returns the
        number of rows claimed (0: nothing left to do for this issuer)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if stale_signers is None:
                rows = await conn.fetch(_CLAIM_DUE, *window.args(issuer_id), limit)
            else:
                rows = await conn.fetch(
                    _CLAIM_STALE_SIGNER,
                    issuer_id,
                    window.now,
                    window.retention,
                    MAX_CERTIFICATE_LIFETIME,
                    limit,
                    list(stale_signers),
                )
            if not rows:
                return 0
            claimed = [_due(row) for row in rows]
            signed = await sign(claimed)
            pairs = [(d, s) for d, s in zip(claimed, signed, strict=True) if s is not None]
            if pairs:
                await conn.execute(
                    _WRITE,
                    issuer_id,
                    [serial_key(d.serial) for d, _ in pairs],
                    [int(s.status) for _, s in pairs],
                    [to_datetime(s.this_update) for _, s in pairs],
                    [to_datetime(s.next_update) for _, s in pairs],
                    [s.der for _, s in pairs],
                    [s.signer or None for _, s in pairs],
                )
            return len(rows)

    async def freshness(
        self, window: Window, stale_signers: dict[int, list[int]], sample_rows: int
    ) -> Freshness:
        """Backlog, rows past their BR deadline, and the age distribution of a sample."""
        async with self.pool.acquire() as conn:
            backlog = 0
            for issuer_id, stale in stale_signers.items():
                backlog += int(await conn.fetchval(_COUNT_DUE, *window.args(issuer_id)))
                backlog += int(
                    await conn.fetchval(
                        _COUNT_STALE_SIGNER,
                        issuer_id,
                        window.now,
                        window.retention,
                        MAX_CERTIFICATE_LIFETIME,
                        stale,
                    )
                )
            past = int(
                await conn.fetchval(
                    _COUNT_PAST_DEADLINE,
                    window.now,
                    window.policy.refresh_margin,
                    window.retention,
                    MAX_CERTIFICATE_LIFETIME,
                )
            )
            estimate = float(
                await conn.fetchval(
                    "SELECT greatest(reltuples, 1) FROM pg_class WHERE oid = 'responses'::regclass"
                )
            )
            percent = min(100.0, 100.0 * sample_rows / estimate)
            quantiles = await conn.fetchval(
                _AGE_QUANTILES, window.now, percent, window.retention, MAX_CERTIFICATE_LIFETIME
            )
        ages = dict(zip(AGE_QUANTILES, quantiles or [], strict=False))
        return Freshness(backlog, past, {q: float(a) for q, a in ages.items() if a is not None})


def _due(row: asyncpg.Record) -> DueResponse:
    revocation = None
    if row["revoked_at"] is not None:
        revocation = Revocation(row["revoked_at"], REASONS_BY_CODE[row["reason"]])
    return DueResponse(
        serial=serial_from_key(bytes(row["serial"])),
        status=CertStatus(row["status"]),
        this_update=int(row["this_update"].timestamp()),
        next_update=int(row["next_update"].timestamp()),
        revocation=revocation,
    )
