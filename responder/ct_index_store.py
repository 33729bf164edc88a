"""PostgreSQL side of the CT-fed index: log positions, index rows, coverage gaps.

The follower's position and the index rows it covers commit in ONE transaction
(``commit_batch``), so a restart resumes exactly after the last committed batch: no gap,
no duplicate. Coverage gaps (an indexed serial with no stored response) are recorded in
that same transaction, and repaired (signed response stored, ``repaired_at`` set) in the
next one; a crash in between leaves an unrepaired gap row that the next repair picks up.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from responder.schema import ct_index_has_not_after
from responder.store import durable_transaction, response_arrays, serial_from_key, serial_key
from signer.response_builder import REASONS_BY_CODE, Revocation, SignedResponse

ENTRY_KINDS = {"x509": 0, "precert": 1}


class PositionConflict(Exception):
    """Another follower advanced this log meanwhile: reload the stored position."""


@dataclass(frozen=True, slots=True)
class LogPosition:
    """A log's row: its id, and the resume state to continue from (None: leaf 0)."""

    db_id: int
    state: str | None
    next_index: int


@dataclass(frozen=True, slots=True)
class IndexRow:
    issuer_id: int
    serial: int
    leaf_index: int
    kind: str  # "x509" | "precert"
    logged_at_ms: int
    not_after: int | None = None  # POSIX seconds, from the logged (pre)certificate


@dataclass(frozen=True, slots=True)
class Gap:
    """A serial known from CT with no stored response (yet)."""

    issuer_id: int
    serial: int
    log_name: str | None
    leaf_index: int | None
    revocation: Revocation | None = None


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    new_serials: int  # index rows inserted (first sightings)
    gaps: list[Gap]  # of those, the ones without a stored response


def _index_statement(with_not_after: bool) -> str:
    """One statement: insert the index rows; of those that were new (first sighting),
    record the ones without a stored response as coverage gaps.

    With migration 0005 the logged notAfter ($7, POSIX seconds) goes in too, and:
    - a serial whose notAfter is before $8 (now - expired_retention; NULL: no bound) is
      not a gap: it is answered ``unauthorized`` by the retention rule and needs no
      response (a follower catching up on years of a log must not sign for every long-
      expired certificate the CA never recorded with us);
    - a row already indexed without a notAfter (an unparseable Validity, or written by a
      process older than 0005) takes this sighting's. The UPDATE reads the statement's
      snapshot, so it never sees the rows this same statement inserts."""
    column, value, array, name = (
        (", not_after", ", to_timestamp(n)", ", $7::bigint[]", ", n")
        if with_not_after
        else ("", "", "", "")
    )
    returning, live, fill = (
        (
            ", not_after",
            " AND ($8::timestamptz IS NULL OR ins.not_after IS NULL OR ins.not_after >= $8)",
            "filled AS ("
            "  UPDATE ct_index t SET not_after = to_timestamp(u.n) "
            "  FROM unnest($2::smallint[], $3::bytea[], $7::bigint[]) AS u(i, s, n) "
            "  WHERE t.issuer_id = u.i AND t.serial = u.s AND t.not_after IS NULL "
            "    AND u.n IS NOT NULL), ",
        )
        if with_not_after
        else ("", "", "")
    )
    return (
        "WITH ins AS ("
        "  INSERT INTO ct_index (issuer_id, serial, log, leaf_index, entry_kind, "
        f"                        logged_at{column}) "
        f"  SELECT i, s, $1, l, k, to_timestamp(t / 1000.0){value} "
        "  FROM unnest($2::smallint[], $3::bytea[], $4::bigint[], $5::smallint[], "
        f"              $6::bigint[]{array}) AS u(i, s, l, k, t{name}) "
        "  ON CONFLICT (issuer_id, serial) DO NOTHING "
        f"  RETURNING issuer_id, serial, leaf_index{returning}), "
        f"{fill}"
        "gaps AS ("
        "  INSERT INTO coverage_gaps (issuer_id, serial, log, leaf_index, detected_by) "
        "  SELECT ins.issuer_id, ins.serial, $1, ins.leaf_index, 'ct-follower' "
        "  FROM ins WHERE NOT EXISTS (SELECT 1 FROM responses r "
        f"    WHERE r.issuer_id = ins.issuer_id AND r.serial = ins.serial){live} "
        "  ON CONFLICT (issuer_id, serial) DO NOTHING "
        "  RETURNING issuer_id, serial, leaf_index) "
        "SELECT NULL::smallint AS issuer_id, NULL::bytea AS serial, "
        "       NULL::bigint AS leaf_index, (SELECT count(*) FROM ins) AS inserted "
        "UNION ALL SELECT issuer_id, serial, leaf_index, NULL FROM gaps"
    )


_INDEX_STATEMENTS = {flag: _index_statement(flag) for flag in (False, True)}


def retired_before(expired_retention: dt.timedelta | None) -> dt.datetime | None:
    """notAfter before this: retired, answered ``unauthorized`` and never signed, never a
    coverage gap to report (docs/deploy.md, "Expired certificates: retention"); None
    without a retention: no serial is."""
    if expired_retention is None:
        return None
    return dt.datetime.now(dt.UTC) - expired_retention


class CTIndexStore:
    def __init__(
        self, pool: asyncpg.Pool, *, expired_retention: dt.timedelta | None = None
    ) -> None:
        self.pool = pool
        #: a serial whose certificate expired longer ago than this is never a coverage gap
        #: (it is retired: answered unauthorized, never signed); None: every serial is
        self.expired_retention = expired_retention
        #: ct_index has not_after (migration 0005): looked up at the first commit
        self.ct_not_after: bool | None = None

    async def ensure_log(self, log_id: bytes, name: str, url: str) -> LogPosition:
        """The log's row (created on first use; name and URL follow the configuration)."""
        row = await self.pool.fetchrow(
            "INSERT INTO ct_logs (log_id, name, url) VALUES ($1, $2, $3) "
            "ON CONFLICT (log_id) DO UPDATE SET name = EXCLUDED.name, url = EXCLUDED.url "
            "RETURNING id, state::text AS state, next_index",
            log_id,
            name,
            url,
        )
        assert row is not None
        return LogPosition(row["id"], row["state"], row["next_index"])

    async def position(self, log_db_id: int) -> LogPosition:
        row = await self.pool.fetchrow(
            "SELECT id, state::text AS state, next_index FROM ct_logs WHERE id = $1", log_db_id
        )
        assert row is not None
        return LogPosition(row["id"], row["state"], row["next_index"])

    async def commit_batch(
        self,
        log_db_id: int,
        log_name: str,
        expected_next_index: int,
        rows: Sequence[IndexRow],
        state_json: str,
        next_index: int,
        tree_size: int,
    ) -> BatchOutcome:
        """Index rows + coverage gaps + the new position, in one transaction.

        ``expected_next_index`` is where this batch starts: if the stored position moved
        (a second follower of the same log), nothing is written (``PositionConflict``).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await conn.fetchval(
                "UPDATE ct_logs SET state = $2::jsonb, next_index = $3, tree_size = $4, "
                "  last_error = NULL, updated_at = now() "
                "WHERE id = $1 AND next_index = $5 RETURNING id",
                log_db_id,
                state_json,
                next_index,
                tree_size,
                expected_next_index,
            )
            if moved is None:
                raise PositionConflict(f"position of log {log_name} moved under us")
            if not rows:
                return BatchOutcome(0, [])
            if self.ct_not_after is None:
                self.ct_not_after = await ct_index_has_not_after(conn)
            result = await conn.fetch(
                _INDEX_STATEMENTS[self.ct_not_after],
                log_db_id,
                [r.issuer_id for r in rows],
                [serial_key(r.serial) for r in rows],
                [r.leaf_index for r in rows],
                [ENTRY_KINDS[r.kind] for r in rows],
                [r.logged_at_ms for r in rows],
                *(
                    [[r.not_after for r in rows], retired_before(self.expired_retention)]
                    if self.ct_not_after
                    else []
                ),
            )
        inserted = next(int(r["inserted"]) for r in result if r["inserted"] is not None)
        return BatchOutcome(
            inserted,
            [
                Gap(g["issuer_id"], serial_from_key(g["serial"]), log_name, g["leaf_index"])
                for g in result
                if g["inserted"] is None
            ],
        )

    async def record_log_error(
        self, log_db_id: int, error: str, tree_size: int | None = None
    ) -> None:
        """Remember why the last poll failed (shown by ct-status); the position stays.

        ``tree_size``: a signature-verified tree head seen before the failure, so that
        ct-status shows how far behind a stuck log is (never lowers the stored size).
        """
        await self.pool.execute(
            "UPDATE ct_logs SET last_error = $2, "
            "  tree_size = GREATEST(tree_size, COALESCE($3::bigint, tree_size)), "
            "  updated_at = now() WHERE id = $1",
            log_db_id,
            error[:1000],
            tree_size,
        )

    async def record_poll_ok(self, log_db_id: int, tree_size: int) -> None:
        """A poll succeeded: clear the last error (a log that did not grow commits no
        batch, so commit_batch would never clear it) and keep the verified tree size."""
        await self.pool.execute(
            "UPDATE ct_logs SET last_error = NULL, tree_size = GREATEST(tree_size, $2), "
            "  updated_at = now() WHERE id = $1",
            log_db_id,
            tree_size,
        )

    async def record_lag(self, log_db_id: int, lag_seconds: float) -> None:
        await self.pool.execute(
            "UPDATE ct_logs SET lag_seconds = $2 WHERE id = $1", log_db_id, lag_seconds
        )

    async def unrepaired_gaps(
        self,
        issuer_ids: Sequence[int],
        limit: int = 1000,
        *,
        skip: Sequence[tuple[int, int]] = (),
    ) -> list[Gap]:
        """Gaps still without a stored response, with any recorded revocation.

        A gap whose certificate has since expired beyond ``expired_retention`` is left out:
        it is retired (answered unauthorized) and is not signed any more. It stays open in
        ``coverage_gaps``, the record that this serial was never covered. ``skip``:
        (issuer id, serial) pairs the caller could not sign in this pass, left out so that
        they never hide the gaps behind them."""
        if self.ct_not_after is None:
            self.ct_not_after = await ct_index_has_not_after(self.pool)
        not_after = "coalesce(c.not_after, t.not_after)" if self.ct_not_after else "c.not_after"
        rows = await self.pool.fetch(
            "SELECT g.issuer_id, g.serial, g.leaf_index, l.name AS log_name, "
            "       v.revoked_at, v.reason "
            "FROM coverage_gaps g "
            "LEFT JOIN ct_logs l ON l.id = g.log "
            "LEFT JOIN revocations v ON v.issuer_id = g.issuer_id AND v.serial = g.serial "
            "LEFT JOIN certificates c ON c.issuer_id = g.issuer_id AND c.serial = g.serial "
            "LEFT JOIN ct_index t ON t.issuer_id = g.issuer_id AND t.serial = g.serial "
            "WHERE g.repaired_at IS NULL AND g.issuer_id = ANY($1::smallint[]) "
            f"  AND ($3::timestamptz IS NULL OR {not_after} IS NULL OR {not_after} >= $3) "
            "  AND NOT EXISTS (SELECT 1 FROM unnest($4::smallint[], $5::bytea[]) AS x(i, s) "
            "                  WHERE x.i = g.issuer_id AND x.s = g.serial) "
            "ORDER BY g.detected_at LIMIT $2",
            list(issuer_ids),
            limit,
            retired_before(self.expired_retention),
            [issuer_id for issuer_id, _ in skip],
            [serial_key(serial) for _, serial in skip],
        )
        return [
            Gap(
                r["issuer_id"],
                serial_from_key(r["serial"]),
                r["log_name"],
                r["leaf_index"],
                Revocation(r["revoked_at"], REASONS_BY_CODE[r["reason"]])
                if r["revoked_at"] is not None
                else None,
            )
            for r in rows
        ]

    async def store_repairs(self, repairs: Sequence[tuple[Gap, SignedResponse]]) -> None:
        """Store the signed responses and mark the gaps repaired, in one transaction.

        A response that appeared meanwhile (a late CA write, a revocation) is kept: it is
        at least as authoritative as ours.
        """
        if not repairs:
            return
        issuer_ids = [g.issuer_id for g, _ in repairs]
        serials = [serial_key(g.serial) for g, _ in repairs]
        async with durable_transaction(self.pool, timeout=None) as conn:
            await conn.execute(
                "INSERT INTO responses (issuer_id, serial, status, this_update, next_update, der, "
                "                       signer) "
                "SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::smallint[], "
                "                     $4::timestamptz[], $5::timestamptz[], $6::bytea[], "
                "                     $7::bigint[]) "
                "ON CONFLICT (issuer_id, serial) DO NOTHING",
                issuer_ids,
                serials,
                *response_arrays([s for _, s in repairs]),
            )
            await conn.execute(
                "UPDATE coverage_gaps g SET repaired_at = now() "
                "FROM unnest($1::smallint[], $2::bytea[]) AS u(i, s) "
                "WHERE g.issuer_id = u.i AND g.serial = u.s AND g.repaired_at IS NULL",
                issuer_ids,
                serials,
            )


async def record_request_gap(
    pool: asyncpg.Pool, issuer_id: int, serial: int, *, repaired: bool
) -> Gap | None:
    """The request path found a CT-only serial without a response: keep it for the operator.

    Returns the gap when it is new (count it), None when the follower already had it.
    """
    row = await pool.fetchrow(
        "WITH ins AS ("
        "  INSERT INTO coverage_gaps (issuer_id, serial, log, leaf_index, detected_by, "
        "                             repaired_at) "
        "  SELECT issuer_id, serial, log, leaf_index, 'request', "
        "         CASE WHEN $3 THEN now() END "
        "  FROM ct_index WHERE issuer_id = $1 AND serial = $2 "
        "  ON CONFLICT (issuer_id, serial) DO UPDATE "
        "    SET repaired_at = coalesce(coverage_gaps.repaired_at, EXCLUDED.repaired_at) "
        "  RETURNING (xmax = 0) AS inserted, log, leaf_index) "
        "SELECT ins.inserted, ins.leaf_index, l.name AS log_name "
        "FROM ins LEFT JOIN ct_logs l ON l.id = ins.log",
        issuer_id,
        serial_key(serial),
        repaired,
    )
    if row is None or not row["inserted"]:
        return None
    return Gap(issuer_id, serial, row["log_name"], row["leaf_index"])


@dataclass(frozen=True, slots=True)
class LogStatus:
    name: str
    url: str
    log_id: bytes
    next_index: int
    tree_size: int
    lag_seconds: float | None
    last_error: str | None
    updated_at: dt.datetime
    indexed: int | None  # None: not counted (ct-status without --counts)
    gaps: int
    gaps_unrepaired: int

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "log_id": self.log_id.hex(),
            "next_index": self.next_index,
            "tree_size": self.tree_size,
            "behind": self.tree_size - self.next_index,
            "lag_seconds": self.lag_seconds,
            "last_error": self.last_error,
            "updated_at": self.updated_at.isoformat(),
            "indexed": self.indexed,
            "gaps": self.gaps,
            "gaps_unrepaired": self.gaps_unrepaired,
        }


async def log_statuses(conn: asyncpg.Connection, *, counts: bool = False) -> list[LogStatus]:
    """Every followed log with its position, lag and gap counts (for ct-status).

    ``counts``: also the serials each log was the first to show. That is a scan of the
    whole CT index (no index on ``log``: none of the serving paths needs one), minutes on
    hundreds of millions of rows, so a monitoring check that runs every minute must not
    pay it by default; everything else here is read by key or from the small tables."""
    indexed = "(SELECT count(*) FROM ct_index i WHERE i.log = l.id)" if counts else "NULL::bigint"
    rows = await conn.fetch(
        "SELECT l.*, "
        f"  {indexed} AS indexed, "
        "  (SELECT count(*) FROM coverage_gaps g WHERE g.log = l.id) AS gaps, "
        "  (SELECT count(*) FROM coverage_gaps g WHERE g.log = l.id "
        "     AND g.repaired_at IS NULL) AS gaps_unrepaired "
        "FROM ct_logs l ORDER BY l.name"
    )
    return [
        LogStatus(
            r["name"],
            r["url"],
            bytes(r["log_id"]),
            r["next_index"],
            r["tree_size"],
            r["lag_seconds"],
            r["last_error"],
            r["updated_at"],
            r["indexed"],
            r["gaps"],
            r["gaps_unrepaired"],
        )
        for r in rows
    ]


async def gap_counts_by_issuer(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    """issuer name -> (gaps, unrepaired gaps), all detectors included."""
    rows = await conn.fetch(
        "SELECT i.name, count(*) AS gaps, count(*) FILTER (WHERE repaired_at IS NULL) AS open "
        "FROM coverage_gaps g JOIN issuers i ON i.id = g.issuer_id GROUP BY i.name ORDER BY 1"
    )
    return {r["name"]: (r["gaps"], r["open"]) for r in rows}
