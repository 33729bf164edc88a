"""Liveness of the event loop: a blocked loop ends the process instead of hoarding connections.

A process whose event loop is blocked (a C-level hang, a deadlock, a runaway synchronous
loop) is alive: the kernel keeps queueing its share of new connections on its listening
socket and those relying parties wait until they time out. Nothing noticed that before.

The loop proves it runs with a timer callback every ``HEARTBEAT_INTERVAL`` seconds (not
per request: nothing on the hot path). Each beat

- stamps ``last_beat`` (a float in this process), read by a watchdog thread: a thread
  still runs while the loop is blocked in Python code, ``time.sleep``, a lock or any C
  call that releases the GIL. Silent for ``timeout``, it logs at ERROR and ends the
  process with ``os._exit(HUNG_EXIT_STATUS)`` (the loop cannot run a clean shutdown);
- with ``serve --workers``, writes one byte to a pipe the supervisor reads
  (responder/workers.py). The supervisor is a second line, for a hang that holds the GIL
  (a C extension spinning without releasing it), where the thread cannot run either: it
  SIGKILLs a worker silent for ``timeout + SUPERVISOR_MARGIN``. A pipe rather than shared
  memory or a file's mtime: no file to create or clean up, the supervisor times the beats
  on its own monotonic clock, and ``select`` waits on all workers at once; a write is one
  non-blocking syscall a second, dropped if the supervisor does not read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

#: seconds between the loop's beats
HEARTBEAT_INTERVAL = 1.0
#: exit status of a process whose event loop hung (1 is an error, 3 the database)
HUNG_EXIT_STATUS = 4
#: the supervisor waits this much longer than a worker's own watchdog, which then
#: normally reports first (its thread checks once a ``HEARTBEAT_INTERVAL``)
SUPERVISOR_MARGIN = 2.0
#: how long the watchdog waits for its log line before it exits anyway: the blocked
#: loop may hold the logging handler's lock (a full stderr pipe)
LOG_WAIT = 1.0


class LoopHeartbeat:
    """The loop's beat, and the thread that ends the process when the beat stops."""

    def __init__(self, timeout: float, *, pipe_fd: int | None = None) -> None:
        #: seconds of silence that count as hung; 0: no watchdog thread (beats still go
        #: to the supervisor's pipe, which applies the same setting)
        self.timeout = timeout
        self.pipe_fd = pipe_fd
        self.last_beat = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Beat now and every ``HEARTBEAT_INTERVAL`` on ``loop``; start the watchdog."""
        if self.pipe_fd is not None:
            os.set_blocking(self.pipe_fd, False)
        self._beat(loop)
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
            self._thread.start()

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.last_beat = time.monotonic()
        if self.pipe_fd is not None:
            try:
                os.write(self.pipe_fd, b".")
            except BlockingIOError:  # the supervisor is behind: it saw beats recently
                pass
            except OSError:  # the supervisor is gone: _flush_stats notices that
                pass
        self._handle = loop.call_later(HEARTBEAT_INTERVAL, self._beat, loop)

    def _watch(self) -> None:
        while not self._stopped.wait(HEARTBEAT_INTERVAL):
            silent = time.monotonic() - self.last_beat
            if silent > self.timeout:
                abort_hung(silent, self.timeout)

    def stop(self) -> None:
        """Stop beating and watching (a clean shutdown: the loop may now end)."""
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()


def abort_hung(silent: float, timeout: float) -> None:
    """Log why, then end the process at once: the loop cannot run a clean shutdown, and
    a non-zero status makes the supervisor or service manager restart it."""
    writer = threading.Thread(
        target=log.error,
        args=(
            "event loop of pid %d blocked for %.1fs (worker_hang_timeout %.0fs): exiting "
            "with status %d so that it is restarted",
            os.getpid(),
            silent,
            timeout,
            HUNG_EXIT_STATUS,
        ),
        daemon=True,
    )
    writer.start()
    writer.join(LOG_WAIT)
    os._exit(HUNG_EXIT_STATUS)
