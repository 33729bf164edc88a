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
admin API, would be worse). Metrics: PROMETHEUS_MULTIPROC_DIR is set for the workers
(a fresh directory unless already set; a given one is emptied of earlier processes'
files) so /metrics aggregates all of them.
"""

from __future__ import annotations

import logging
import os
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
    # orphaned for a second and its metrics directory behind (responder/server.py)
    signal.signal(signal.SIGHUP, lambda signum, frame: log.warning(SIGHUP_IGNORED))
    base = [sys.executable, "-m", "responder.cli", "serve"]
    if config.source is not None:
        base += ["--config", str(config.source)]
    procs: list[subprocess.Popen[bytes]] = []
    status = 0
    try:
        for index in range(workers):
            procs.append(
                subprocess.Popen(
                    [*base, "--worker-of", f"{socks[index].fileno()}:{index}:{os.getpid()}"],
                    pass_fds=(socks[index].fileno(),),
                )
            )
        log.info("supervisor %d: %d workers on %s:%d", os.getpid(), workers, host, port)
        while not stopping:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                log.error(
                    "worker %d exited with %s: stopping all workers",
                    dead[0].pid,
                    dead[0].returncode,
                )
                # its own status when it failed (3: the database, as `serve` alone exits),
                # else 1: a worker killed by a signal, or one that ended by itself
                status = dead[0].returncode if dead[0].returncode > 0 else 1
                break
            time.sleep(0.2)
    finally:
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
