"""``ocsp-responder ct-status``: each CT log's position, lag and gaps, for an operator."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import asyncpg

from responder.config import Config
from responder.ct_coverage import open_gaps_query
from responder.ct_index_store import gap_counts_by_issuer, log_statuses, retired_before
from responder.schema import check_schema, ct_index_has_not_after


async def collect(config: Config, dsn: str, *, counts: bool = False) -> dict[str, Any]:
    """The status document (what ``--json`` prints): logs, gaps per issuer; ``counts``:
    also the serials indexed per log (a scan of the whole CT index: ``--counts``)."""
    conn = await asyncpg.connect(dsn)
    try:
        await check_schema(conn)
        statuses = await log_statuses(conn, counts=counts)
        by_issuer = await gap_counts_by_issuer(conn)
        live = await _open_unretired_gaps(conn, config)
    finally:
        await conn.close()
    seen = {s.url for s in statuses}
    polls = {cfg.url: cfg.poll_interval for cfg in config.ct_logs}
    now = dt.datetime.now(dt.UTC)
    logs: list[dict[str, Any]] = []
    for status in statuses:
        item = status.as_json()
        if status.url in polls:
            # a configured log whose row nobody wrote for this long has no live follower
            # (not running, or stuck): lost recordings published meanwhile stay unanswered
            limit = polls[status.url] + STALE_AFTER
            item["stale"] = now - status.updated_at > limit
        logs.append(item)
    for cfg in config.ct_logs:
        if cfg.url not in seen:
            logs.append({"name": cfg.name, "url": cfg.url, "state": "never polled"})
    return {
        "logs": logs,
        "gaps_by_issuer": {
            name: {
                "gaps": total,
                "unrepaired": open_,
                # open for good on purpose: expired beyond expired_retention, answered
                # unauthorized and never signed (docs/ct-index.md, "Gap repair")
                "retired": open_ - live.get(name, 0),
            }
            for name, (total, open_) in by_issuer.items()
        },
    }


async def _open_unretired_gaps(conn: asyncpg.Connection, config: Config) -> dict[str, int]:
    """issuer name -> unrepaired gaps that are not retired: the ones a check should
    report (the same count as serve's ``coverage_gaps_open``)."""
    rows = await conn.fetch(
        open_gaps_query(await ct_index_has_not_after(conn)),
        retired_before(config.expired_retention),
    )
    names = {r["id"]: r["name"] for r in await conn.fetch("SELECT id, name FROM issuers")}
    return {names[r["issuer_id"]]: r["open"] for r in rows}


#: exit statuses of ``ct-status`` (docs/ct-index.md): a monitoring check can run it as is
EXIT_OK = 0
#: a log's last poll failed (``last_error`` is set), or a configured log is not followed:
#: never polled, or its row not written for ``poll_interval`` + ``STALE_AFTER``
EXIT_LOG_ERROR = 1
#: no failing log, but coverage gaps are not repaired (no answer signed), leaving out
#: retired ones (they stay open for good: they would hold the check at 2 for ever)
EXIT_OPEN_GAPS = 2
#: how long past its poll interval a configured log's row may go unwritten
STALE_AFTER = dt.timedelta(minutes=5)


def not_followed(item: dict[str, Any]) -> bool:
    """A configured log that no follower has polled, or not lately."""
    return item.get("state") == "never polled" or bool(item.get("stale"))


def exit_status(doc: dict[str, Any]) -> int:
    """1 if a log's last poll failed or a configured log is not followed, else 2 if a
    coverage gap is open, else 0."""
    if any(item.get("last_error") or not_followed(item) for item in doc["logs"]):
        return EXIT_LOG_ERROR
    if any(g["unrepaired"] - g.get("retired", 0) for g in doc["gaps_by_issuer"].values()):
        return EXIT_OPEN_GAPS
    return EXIT_OK


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)


def render_table(doc: dict[str, Any], now: dt.datetime | None = None) -> str:
    """A fixed-width table, one line per log, then gaps per issuer."""
    now = now or dt.datetime.now(dt.UTC)
    header = ("log", "next index", "tree size", "behind", "lag", "updated", "indexed", "gaps")
    rows: list[tuple[str, ...]] = [header]
    errors: list[str] = []
    for item in doc["logs"]:
        if "next_index" not in item:
            rows.append((item["name"], "-", "-", "-", "-", "never polled", "-", "-"))
            errors.append(f"{item['name']}: never polled: is a follower running?")
            continue
        updated = dt.datetime.fromisoformat(item["updated_at"])
        lag = item["lag_seconds"]
        rows.append(
            (
                item["name"],
                str(item["next_index"]),
                str(item["tree_size"]),
                str(item["behind"]),
                "-" if lag is None else f"{lag:.1f}s",
                f"{(now - updated).total_seconds():.0f}s ago",
                "-" if item["indexed"] is None else str(item["indexed"]),
                f"{item['gaps']} ({item['gaps_unrepaired']} open)",
            )
        )
        if item["last_error"]:
            errors.append(f"{item['name']}: last poll failed: {item['last_error']}")
        if item.get("stale"):
            errors.append(
                f"{item['name']}: not polled for {(now - updated).total_seconds():.0f}s: "
                "is a follower running?"
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += errors
    gaps = doc["gaps_by_issuer"]
    if gaps:
        lines.append("coverage gaps by issuer:")
        for name, g in gaps.items():
            retired = f", {g['retired']} of them retired" if g.get("retired") else ""
            lines.append(f"  {name}: {g['gaps']} ({g['unrepaired']} not repaired{retired})")
    else:
        lines.append("coverage gaps: none")
    return "\n".join(lines)
