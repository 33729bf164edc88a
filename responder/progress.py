"""A one-line progress bar on stderr, small enough not to need a library.

On a terminal it redraws in place a few times a second; when stderr is a file or a pipe
(CI, systemd) it writes a plain line every ``log_interval`` seconds instead, so logs stay
readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Counts done/total items and shows rate and time left."""

    def __init__(
        self,
        total: int,
        *,
        unit: str = "certificates",
        stream: TextIO | None = None,
        log_interval: float = 10.0,
    ) -> None:
        self.total = total
        self.done = 0
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else log_interval
        self.started = time.monotonic()
        self._last_draw = 0.0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = self.done / self.total if self.total else 1.0
        width = 30
        filled = int(share * width)
        eta = f"{left:,.0f}s left" if left != float("inf") else "--"
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done:,}/{self.total:,} "
            f"{self.unit} {share:6.1%} {rate:,.0f}/s {eta}"
        )

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\x1b[K")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Final state, on its own line."""
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\x1b[K\n")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()
