"""Write-back of on-demand responses, batched: one INSERT for whatever piled up meanwhile.

An on-demand answer is sent before its response is stored (a failed write changes
nothing for that request: the next one signs again). Writes queue here; one background
task stores the queue in one statement, and while that statement runs the next batch
gathers, so under load the cost per response falls to a share of one round trip.
Bounded: beyond ``max_pending`` queued responses new ones are not written back (logged).
"""

from __future__ import annotations

import asyncio
import logging

from responder.store import PresignedStore
from signer.response_builder import SignedResponse

log = logging.getLogger(__name__)


class WriteBack:
    """Queue of (issuer id, serial, response) to store, flushed by one task."""

    def __init__(self, store: PresignedStore, max_pending: int = 10_000) -> None:
        self.store = store
        self.max_pending = max_pending
        self._pending: list[tuple[int, int, SignedResponse]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dropped = 0
        self._closing = False

    def add(self, issuer_id: int, serial: int, signed: SignedResponse) -> None:
        """Queue one response (returns at once)."""
        if self._closing or len(self._pending) >= self.max_pending:
            self._dropped += 1
            if self._dropped % 1000 == 1:
                log.warning("write-back queue full: %d responses not stored", self._dropped)
            return
        self._pending.append((issuer_id, serial, signed))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="write-back")
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self.store.store_responses(batch)
        except Exception as exc:
            log.warning(
                "write-back of %d on-demand responses failed: %s", len(batch), type(exc).__name__
            )

    async def drain(self, timeout: float = 5.0) -> None:
        """Let the batch in flight finish, store what is still queued (bounded), stop."""
        self._closing = True
        self._wake.set()
        try:
            if self._task is not None:
                await asyncio.wait_for(self._task, timeout)
            await asyncio.wait_for(self._flush(), timeout)
        except TimeoutError:
            log.warning("write-back: responses not stored at shutdown")
