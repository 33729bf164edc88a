"""The refresher's SQL: claiming due responses, writing re-signed ones, sampling freshness.

Kept apart from ``store.py`` (the serving and recording path) because its queries are
about time windows rather than single rows. Every claim is one short transaction:
``SELECT ... FOR UPDATE OF r SKIP LOCKED`` picks rows nobody else is refreshing right now,
the caller signs them, the UPDATE writes them back, COMMIT releases the locks. Several
refreshers (one per ``serve`` instance, plus ``ocsp-responder refresh``) therefore never
sign the same row twice at once, and a crash mid-batch only rolls back that batch.

When a row is due (all in SQL, mirroring ``signer.response_builder.renewal_point``):
a response with the configured validity renews ``refresh_margin`` before nextUpdate (a
longer one, from before the validity was lowered, at its BR 4.9.9 deadline if that comes
first); one whose nextUpdate was capped by an expiring signer certificate renews at its own
BR 4.9.9 deadline. Each row is claimed ``spread * (0.25 .. 1.0)`` before that point, the fraction
taken from the serial's last byte (serials are random), so rows signed in the same second
(a bulk import, a rollover) come due spread over ``spread`` instead of all at once.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from responder.schema import ct_index_has_not_after, responses_has_this_update_index

# A serial revoked without any certificate record has no known notAfter; its certificate
# was issued before the revocation and lives at most 398 days (BR 6.3.2), so it has
# certainly expired MAX_CERTIFICATE_LIFETIME after the revocation time.
from responder.store import (
    MAX_CERTIFICATE_LIFETIME,
    PresignedStore,
    response_arrays,
    serial_from_key,
    serial_key,
)
from signer.response_builder import (
    REASONS_BY_CODE,
    CertStatus,
    Revocation,
    SignedResponse,
    ValidityPolicy,
)


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
          THEN least(r.next_update - :margin::interval, {_BR_DEADLINE})
          ELSE {_BR_DEADLINE} END)"""

_JITTER = ":spread::interval * (0.25 + 0.75 * get_byte(r.serial, length(r.serial) - 1) / 255.0)"


#: True while the certificate is in the refresh cycle: not expired longer than the
#: retention. Its notAfter is the recorded one, else (a serial known only from CT) the
#: logged certificate's, else (revoked without either) revocation + the longest BR
#: lifetime; with none known it is kept.
def _in_cycle(ct_not_after: bool) -> str:
    ct = "t.not_after, " if ct_not_after else ""
    return f"""
    coalesce(c.not_after, {ct}v.revoked_at + :lifetime::interval, 'infinity'::timestamptz)
        + :retention::interval > :now::timestamptz"""


def _joins(ct_not_after: bool) -> str:
    ct = (
        "\n    LEFT JOIN ct_index t ON t.issuer_id = r.issuer_id AND t.serial = r.serial"
        if ct_not_after
        else ""
    )
    return f"""
    FROM responses r
    LEFT JOIN certificates c ON c.issuer_id = r.issuer_id AND c.serial = r.serial
    LEFT JOIN revocations v ON v.issuer_id = r.issuer_id AND v.serial = r.serial{ct}"""


_COLUMNS = "r.serial, r.status, r.this_update, r.next_update, v.revoked_at, v.reason"

_WINDOW = ("issuer", "now", "margin", "spread", "validity", "retention", "lifetime")


def _candidates(this_update_index: bool, *, ahead: str) -> str:
    """The indexed superset of the rows whose BR deadline (or renewal point) may be within
    ``ahead`` (a SQL interval) from now; the exact test follows it in each query.

    By nextUpdate alone (responses_next_update) a row is reached ``refresh_margin`` before
    nextUpdate. That covers every row signed under the configured validity or a shorter
    one, but not one signed under a longer validity before the operator lowered it: its
    BR deadline is 4 days after thisUpdate, days before nextUpdate - refresh_margin. With
    migration 0007's index such rows are also found by thisUpdate: every BR deadline is
    at most 4 days after thisUpdate, and otherwise at least nextUpdate - 8 hours (a
    shorter margin, allowed below 16 h validity, is widened to that)."""
    if not this_update_index:
        return f"r.next_update <= :now::timestamptz + :margin::interval + {ahead}"
    return (
        "(r.next_update <= :now::timestamptz + greatest(:margin::interval, "
        f"interval '8 hours') + {ahead} "
        f"OR r.this_update <= :now::timestamptz - interval '4 days' + {ahead})"
    )


@dataclass(frozen=True, slots=True)
class _Statements:
    """The refresher's queries, for a schema with or without ``ct_index.not_after``
    (migration 0005, expand-only: used once it has run; ``RefreshStore`` looks)."""

    claim_due: str
    claim_stale_signer: str
    count_due: str
    count_stale_signer: str
    count_past_deadline: str
    age_quantiles: str
    #: readiness (responder/health.py): rows whose nextUpdate is before :threshold and
    #: whose renewal point (as the refresher reckons it) is more than :slack ago, of
    #: certificates in the cycle (with retention 0: not yet expired)
    count_overdue: str

    @classmethod
    def build(cls, ct_not_after: bool, this_update_index: bool = False) -> _Statements:
        joins, in_cycle = _joins(ct_not_after), _in_cycle(ct_not_after)
        past = _candidates(this_update_index, ahead="interval '0'")
        # readiness: :threshold is now + refresh_margin - slack; with the index, as for the
        # claim, also the rows a renewal point of nextUpdate - 8 h or thisUpdate + 4 days
        # makes overdue
        overdue_candidates = (
            "(r.next_update < :threshold::timestamptz "
            "OR r.next_update < :now::timestamptz + interval '8 hours' - :slack::interval "
            "OR r.this_update < :now::timestamptz - interval '4 days' - :slack::interval)"
            if this_update_index
            else "r.next_update < :threshold::timestamptz"
        )
        due_where = f"""
    WHERE r.issuer_id = :issuer
      AND {_candidates(this_update_index, ahead=":spread::interval")}
      AND {_RENEWAL_POINT} - {_JITTER} <= :now::timestamptz
      AND {in_cycle}"""
        #: :stale: fingerprints of this issuer's responders that are no longer the active
        #: one; a row signed by a responder not configured at all (:known) is stale too
        #: when it was signed before :older_than (SignerSet: then that responder is older
        #: than the active one, not a newer one this instance does not know yet)
        stale_where = f"""
    WHERE r.issuer_id = :issuer
      AND (r.signer = ANY(:stale::bigint[]) OR r.signer IS NULL
           OR ((r.signer < :active::bigint OR r.signer > :active::bigint)
               AND r.signer <> ALL(:known::bigint[])
               AND r.this_update < :older_than::timestamptz))
      AND r.next_update > :now::timestamptz
      AND {in_cycle}"""
        stale_names = (
            "issuer",
            "now",
            "retention",
            "lifetime",
            "stale",
            "active",
            "known",
            "older_than",
        )
        return cls(
            claim_due=_numbered(
                f"SELECT {_COLUMNS} {joins} {due_where} "
                "ORDER BY r.next_update LIMIT :limit FOR UPDATE OF r SKIP LOCKED",
                (*_WINDOW, "limit"),
            ),
            claim_stale_signer=_numbered(
                f"SELECT {_COLUMNS} {joins} {stale_where} LIMIT :limit FOR UPDATE OF r SKIP LOCKED",
                (*stale_names, "limit"),
            ),
            count_due=_numbered(f"SELECT count(*) {joins} {due_where}", _WINDOW),
            count_stale_signer=_numbered(f"SELECT count(*) {joins} {stale_where}", stale_names),
            # BR 4.9.9 deadline passed. Without migration 0007's index the candidate bound
            # holds for rows of the configured validity or shorter only (their deadline is
            # never earlier than nextUpdate - refresh_margin); a row signed under a longer
            # validity is then counted only once inside it, like claim_due (docs/deploy.md)
            count_past_deadline=_numbered(
                f"SELECT count(*) {joins} "
                f"WHERE {past} "
                f"AND {_BR_DEADLINE} < :now::timestamptz AND {in_cycle}",
                ("now", "margin", "retention", "lifetime"),
            ),
            age_quantiles=_numbered(
                "SELECT percentile_disc(ARRAY[0.5, 0.9, 0.99, 1.0]::float8[]) "
                "       WITHIN GROUP (ORDER BY extract(epoch FROM :now::timestamptz - "
                "r.this_update)) "
                + joins.replace(
                    "FROM responses r", "FROM responses r TABLESAMPLE SYSTEM (:percent::float8)"
                )
                + f" WHERE {in_cycle}",
                ("now", "percent", "retention", "lifetime"),
            ),
            # a response capped by an expiring signer renews at its own BR deadline, later
            # than nextUpdate - margin: it is not overdue before then
            count_overdue=_numbered(
                f"SELECT count(*) {joins} WHERE {overdue_candidates} "
                f"AND {_RENEWAL_POINT} + :slack::interval < :now::timestamptz AND {in_cycle}",
                ("threshold", "now", "retention", "lifetime", "margin", "validity", "slack"),
            ),
        )


_STATEMENTS = {
    (ct_flag, index_flag): _Statements.build(ct_flag, index_flag)
    for ct_flag in (False, True)
    for index_flag in (False, True)
}


def overdue_query(ct_not_after: bool, this_update_index: bool = False) -> str:
    """Readiness's count of responses overdue for refresh, reckoning which certificates
    are still in the cycle and when a response is due exactly as the refresher does: $1
    threshold (now + margin - slack), $2 now, $3 retention, $4 MAX_CERTIFICATE_LIFETIME,
    $5 refresh_margin, $6 response_validity, $7 refresh_deadline_slack."""
    return _STATEMENTS[(ct_not_after, this_update_index)].count_overdue


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


#: thisUpdate is backdated at most this much (ValidityPolicy.check): a response signed by
#: a responder has thisUpdate >= its notBefore - MAX_BACKDATE
MAX_BACKDATE = dt.timedelta(hours=2)


@dataclass(frozen=True, slots=True)
class SignerSet:
    """Which of an issuer's stored responses were signed by a retired responder.

    ``stale``: configured responders other than the active one. A responder that is not
    configured at all (replaced in place) is retired too, but only for rows signed before
    the active responder's notBefore - MAX_BACKDATE: a newer certificate that this
    instance does not know yet (another instance already restarted with it) signs only
    after its own notBefore, which is later, so its rows are never taken back."""

    stale: Sequence[int]
    active: int | None = None
    known: Sequence[int] = ()
    older_than: dt.datetime | None = None

    @classmethod
    def of(cls, signers: Sequence[int] | SignerSet) -> SignerSet:
        """A plain list means: only these (no unknown-signer rule)."""
        return signers if isinstance(signers, SignerSet) else cls(list(signers))

    def args(self) -> list[object]:
        """Values for (stale, active, known, older_than), in order."""
        return [list(self.stale), self.active, list(self.known), self.older_than]


@dataclass(frozen=True, slots=True)
class Freshness:
    """What the periodic sampler exports (see responder/metrics.py)."""

    backlog: int
    past_deadline: int
    age_quantiles: dict[str, float]


#: signs the claimed rows (in a worker thread); None for a row it must leave alone
BatchSigner = Callable[[list[DueResponse]], Awaitable[list[SignedResponse | None]]]


class RefreshStore:
    def __init__(self, pool: asyncpg.Pool, *, schema: PresignedStore | None = None) -> None:
        """``schema``: the store whose schema flags (looked up when it connected) decide
        the statements, so that the refresher and readiness read the same schema the same
        way; without it they are looked up here, at first use."""
        self.pool = pool
        self._statements: _Statements | None = (
            _STATEMENTS[(schema.ct_not_after, schema.this_update_index)]
            if schema is not None
            else None
        )

    async def _sql(self) -> _Statements:
        """The queries for this schema (looked up once: ``ct_index.not_after`` or not,
        ``responses_this_update`` or not)."""
        if self._statements is None:
            flags = (
                await ct_index_has_not_after(self.pool),
                await responses_has_this_update_index(self.pool),
            )
            self._statements = _STATEMENTS[flags]
        return self._statements

    async def refresh_batch(
        self,
        issuer_id: int,
        window: Window,
        limit: int,
        sign: BatchSigner,
        *,
        stale_signers: Sequence[int] | SignerSet | None = None,
    ) -> int:
        """Claim up to ``limit`` due rows (or, with ``stale_signers``, rows signed by a
        retired responder), sign them, write them back; one transaction. Returns the
        number of rows claimed (0: nothing left to do for this issuer)."""
        sql = await self._sql()
        async with self.pool.acquire() as conn, conn.transaction():
            if stale_signers is None:
                rows = await conn.fetch(sql.claim_due, *window.args(issuer_id), limit)
            else:
                rows = await conn.fetch(
                    sql.claim_stale_signer,
                    issuer_id,
                    window.now,
                    window.retention,
                    MAX_CERTIFICATE_LIFETIME,
                    *SignerSet.of(stale_signers).args(),
                    limit,
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
                    *response_arrays([s for _, s in pairs]),
                )
            return len(rows)

    async def freshness(
        self,
        window: Window,
        stale_signers: dict[int, list[int]] | dict[int, SignerSet],
        sample_rows: int,
    ) -> Freshness:
        """Backlog, rows past their BR deadline, and the age distribution of a sample."""
        sql = await self._sql()
        async with self.pool.acquire() as conn:
            backlog = 0
            for issuer_id, stale in stale_signers.items():
                backlog += int(await conn.fetchval(sql.count_due, *window.args(issuer_id)))
                backlog += int(
                    await conn.fetchval(
                        sql.count_stale_signer,
                        issuer_id,
                        window.now,
                        window.retention,
                        MAX_CERTIFICATE_LIFETIME,
                        *SignerSet.of(stale).args(),
                    )
                )
            past = int(
                await conn.fetchval(
                    sql.count_past_deadline,
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
                sql.age_quantiles, window.now, percent, window.retention, MAX_CERTIFICATE_LIFETIME
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
