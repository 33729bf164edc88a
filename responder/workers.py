"""``serve --workers N``: N worker processes on one port, sharing only PostgreSQL.

The supervisor (this process) binds the OCSP port, one listening socket per worker with
SO_REUSEPORT, and starts N copies of ``ocsp-responder serve``, each inheriting its own
socket (``--worker-of FD:INDEX``). The kernel spreads new connections over the sockets
by a hash of their addresses. With one shared socket, every worker woke for each burst of
connections and the first to run accepted them all (libuv accepts until the queue is
empty): a benchmark's 16 connections could all land on one worker while the other idled. Each worker has its own event loop, database
pool, in-process cache and warm-up. Worker 0 alone runs the admin API and the
once-per-deployment background tasks (``ResponderService.primary``). The supervisor
itself holds no database connection and no keys.

SIGTERM/SIGINT to the supervisor stops every worker (each finishes its open requests).
If a worker dies, the supervisor stops the others and exits non-zero, so that the
service manager restarts the whole set (a half-running set, e.g. without worker 0's
admin API, would be worse). A worker whose event loop is blocked is made to die: its own
watchdog thread ends it, and the supervisor SIGKILLs one whose beats on its heartbeat
pipe stop for ``worker_hang_timeout`` (+ a margin) (responder/loop_watchdog.py). Metrics: PROMETHEUS_MULTIPROC_DIR is set for the workers
(a fresh directory unless already set; a given one is emptied of earlier processes'
files) so /metrics aggregates all of them.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from responder.config import Config
from responder.loop_watchdog import HUNG_EXIT_STATUS, SUPERVISOR_MARGIN

log = logging.getLogger(__name__)

#: logged on SIGHUP, by the supervisor and each worker
SIGHUP_IGNORED = "SIGHUP ignored: there is no reload; restart to apply a new configuration"
#: how long workers get to finish after SIGTERM before they are killed
STOP_TIMEOUT = 15.0


def bind_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """One OCSP listening socket per worker on the same port (SO_REUSEPORT), inheritable.

    Bound here, before any worker starts, so that a port in use fails the supervisor at
    once. SO_REUSEPORT lets only processes of the same user join the group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_server((host, port), family=family, backlog=4096, reuse_port=True)
            sock.set_inheritable(True)
            socks.append(sock)
            port = sock.getsockname()[1]  # port 0: the others join the one the first got
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def remove_stale_samples(metrics_dir: Path, own_pid: int) -> list[str]:
    """Delete the sample files of earlier processes from the metrics directory; returns
    their names.

    A directory that outlives the set (a Kubernetes emptyDir across a container restart,
    one the operator created; systemd's RuntimeDirectory is emptied for us) still holds
    the files of a set that was killed: prometheus-client aggregates every file, so a dead
    worker's ocsp_ready 0 held ``min(ocsp_ready)`` at 0 for good and its pool gauges and
    counters were added to the live ones. In a new container the new workers may even get
    the old pids and reopen the old files. Only this process's own file stays: nothing
    else in the directory can belong to this set, which has not started yet."""
    removed = []
    for path in metrics_dir.glob("*.db"):
        if path.stem.rsplit("_", 1)[-1] == str(own_pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        log.warning(
            "removed %d metrics files of earlier processes from %s", len(removed), metrics_dir
        )
    return removed


def run_workers(config: Config, workers: int) -> int:
    """Supervise ``workers`` worker processes until a signal or a worker's death."""
    host, port = config.listen
    try:
        socks = bind_listeners(host, port, workers)
    except OSError as exc:  # name the key, as `serve` without workers does
        raise OSError(f"listen {host}:{port}: {exc.strerror or exc}") from exc
    own_metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_metrics_dir = tempfile.mkdtemp(prefix="ocsp-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
    else:
        # with the directory set before start (the systemd unit of docs/deploy.md) this
        # process wrote its own samples there at import: its ocsp_ready, 0 since it checks
        # nothing, held the workers' minimum at 0 for good
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
        remove_stale_samples(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]), os.getpid())
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # no reload: SIGHUP's default action killed the supervisor at once, its workers left
    # orphaned for a second and its metrics directory behind (responder/server.py). While
    # the workers are spawned it stays SIG_IGN, a disposition they inherit across exec (a
    # handler is reset to the default), so one sent during their start-up, before their
    # loop's own handler, does not kill them either; logged once they are all started.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    base = [sys.executable, "-m", "responder.cli", "serve"]
    if config.source is not None:
        base += ["--config", str(config.source)]
    procs: list[subprocess.Popen[bytes]] = []
    heartbeats = HeartbeatWatch(config.worker_hang_timeout.total_seconds())
    status = 0
    try:
        for index in range(workers):
            beat_fd = heartbeats.add()
            worker_of = f"{socks[index].fileno()}:{index}:{os.getpid()}:{beat_fd}"
            try:
                procs.append(
                    subprocess.Popen(
                        [*base, "--worker-of", worker_of],
                        pass_fds=(socks[index].fileno(), beat_fd),
                    )
                )
            finally:
                os.close(beat_fd)  # the worker holds the write end: EOF when it dies
        log.info("supervisor %d: %d workers on %s:%d", os.getpid(), workers, host, port)
        signal.signal(signal.SIGHUP, lambda signum, frame: log.warning(SIGHUP_IGNORED))
        killed_hung: set[int] = set()
        while not stopping:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                log.error(
                    "worker %d exited with %s: stopping all workers",
                    dead[0].pid,
                    dead[0].returncode,
                )
                # its own status when it failed (3: the database, as `serve` alone exits;
                # 4: its loop hung), else 1: a worker killed by a signal, or one that
                # ended by itself
                status = dead[0].returncode if dead[0].returncode > 0 else 1
                if dead[0].pid in killed_hung:
                    status = HUNG_EXIT_STATUS
                break
            for index, silent in heartbeats.wait(0.2):
                hung = procs[index]
                log.error(
                    "worker %d (pid %d): event loop silent for %.1fs (worker_hang_timeout "
                    "%.0fs): killing it (SIGKILL)",
                    index,
                    hung.pid,
                    silent,
                    heartbeats.timeout,
                )
                hung.kill()
                hung.wait()
                killed_hung.add(hung.pid)
    finally:
        heartbeats.close()
        for sock in socks:
            sock.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    return status


class HeartbeatWatch:
    """The read ends of the workers' heartbeat pipes, and when each last beat.

    A worker is watched from its first beat on (its loop starts beating once its keys
    are loaded and its database connected): a slow start is not a hang."""

    def __init__(self, timeout: float) -> None:
        #: seconds of silence that count as hung (0: never)
        self.timeout = timeout
        self._reads: list[int] = []
        self._last: list[float | None] = []

    def add(self) -> int:
        """A pipe for the next worker; returns the write end to hand it."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._reads.append(read_fd)
        self._last.append(None)
        return write_fd

    def wait(self, seconds: float) -> list[tuple[int, float]]:
        """Read beats for up to ``seconds``; the (index, silence) of each hung worker."""
        open_fds = [fd for fd in self._reads if fd >= 0]
        readable: list[int] = []
        if open_fds:
            readable = select.select(open_fds, [], [], seconds)[0]
        else:  # every worker gone: the caller's poll() ends the loop
            time.sleep(seconds)
        now = time.monotonic()
        for fd in readable:
            index = self._reads.index(fd)
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if data:
                self._last[index] = now
            else:  # EOF: the worker is gone, and the caller's poll() sees it
                os.close(fd)
                self._reads[index] = -1
        if self.timeout <= 0:
            return []
        limit = self.timeout + SUPERVISOR_MARGIN
        hung = []
        for index, last in enumerate(self._last):
            if last is not None and self._reads[index] >= 0 and now - last > limit:
                hung.append((index, now - last))
                self._last[index] = None  # reported once
        return hung

    def close(self) -> None:
        for fd in self._reads:
            if fd >= 0:
                os.close(fd)
        self._reads = [-1] * len(self._reads)
