"""The follower's commit pipeline: order, bounded look-ahead, and both failure sides."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from responder.ct_indexer import pipelined


class Boom(Exception):
    pass


async def source(
    n: int, fail_after: int | None = None, log: list[str] | None = None
) -> AsyncIterator[int]:
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise Boom(f"fetch {i}")
        if log is not None:
            log.append(f"made {i}")
        yield i


async def test_commits_in_order_one_batch_ahead() -> None:
    events: list[str] = []

    async def commit(i: int) -> None:
        events.append(f"commit {i}")

    await pipelined(source(5, log=events), commit)
    assert [e for e in events if e.startswith("commit")] == [f"commit {i}" for i in range(5)]
    # never more than two batches made but not committed (one queued, one being made)
    for k in range(len(events)):
        made = sum(x.startswith("made") for x in events[: k + 1])
        done = sum(x.startswith("commit") for x in events[: k + 1])
        assert made - done <= 2, events


async def test_fetch_error_after_committing_what_was_handed_over() -> None:
    committed: list[int] = []

    async def commit(i: int) -> None:
        committed.append(i)

    with pytest.raises(Boom):
        await pipelined(source(10, fail_after=3), commit)
    assert committed == [0, 1, 2]


async def test_commit_error_stops_fetching() -> None:
    made: list[str] = []

    async def commit(i: int) -> None:
        if i == 1:
            raise Boom("database")

    with pytest.raises(Boom, match="database"):
        await pipelined(source(100, log=made), commit)
    assert len(made) <= 4
