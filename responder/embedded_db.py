"""An embedded PostgreSQL (pgserver) for when no ``database_url`` is configured.

For trying the responder and for the demo; production points ``database_url`` at a real,
backed-up cluster. The cluster lives under ``data_dir/postgres`` and is stopped when the
last process that uses it exits.

Two things a crash (SIGKILL, OOM, power loss, a container restart) leaves behind are
cleared before the cluster is started or reused (docs/operations.md, "Embedded
PostgreSQL"): the pid of the killed process in pgserver's list of users of the cluster
(it never removes itself, so no later process was ever the last one and the cluster was
never stopped again), and a ``postmaster.pid`` naming a pid that another program now has
(pgserver took that server for running and handed out a dead socket: "connection
refused" on every start until someone found the file).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: pgserver's list of the processes using a cluster (pgserver.utils.DiskList, in pgdata)
HANDLE_LIST = ".handle_pids.json"


class EmbeddedDatabaseError(Exception):
    """The embedded PostgreSQL could not be started."""


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) the cluster under ``data_dir/postgres``; returns its DSN."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset on servers
            import pgserver
            from pgserver.postgres_server import PostgresServer
    except ImportError as exc:  # pragma: no cover - pgserver is a declared dependency
        raise EmbeddedDatabaseError("pgserver is not installed: pip install pgserver") from exc
    pgdata = data_dir.resolve() / "postgres"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        with PostgresServer._lock:  # pgserver's own lock over its list and the start
            forget_dead_users(pgdata)
            clear_stale_pid_file(pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    except Exception as exc:
        raise EmbeddedDatabaseError(
            f"embedded PostgreSQL failed to start in {pgdata}: {exc}"
        ) from exc
    # after pgserver's own exit hook, so it runs first (atexit is last in, first out)
    atexit.register(_forget_dead_users_at_exit, pgdata, PostgresServer._lock)
    uri: str = server.get_uri()
    log.info("embedded PostgreSQL running in %s", pgdata)
    return uri


def _forget_dead_users_at_exit(pgdata: Path, lock: Any) -> None:
    """Before pgserver's exit hook decides whether this is the last user of the cluster:
    with ``serve --workers`` a killed worker's pid stayed in the list, so the worker that
    exited last (cleanly, stopped by the supervisor) left the cluster running after the
    whole set had stopped."""
    try:
        with lock:
            forget_dead_users(pgdata)
    except OSError as exc:  # the exit goes on; pgserver's hook then decides as before
        log.warning("embedded PostgreSQL: cannot read its list of users: %s", exc)


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists (zombies included: not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def forget_dead_users(pgdata: Path) -> list[int]:
    """Drop the pids of exited processes from pgserver's list of the cluster's users, so
    that the last live one stops it; returns the pids dropped. An unreadable list (torn by
    a crash mid-write) is reset: pgserver would fail on it with a bare JSON error."""
    path = pgdata / HANDLE_LIST
    if not path.exists():
        return []
    try:
        pids = json.loads(path.read_text())
        if not isinstance(pids, list) or not all(isinstance(p, int) for p in pids):
            raise ValueError("not a list of pids")
    except ValueError:
        log.warning("embedded PostgreSQL: %s is unreadable; starting it afresh", path)
        pids = []
    dead = [pid for pid in pids if not process_exists(pid)]
    if dead or not pids:
        path.write_text(json.dumps([pid for pid in pids if pid not in dead]))
    if dead:
        log.warning(
            "embedded PostgreSQL: processes %s exited without stopping it (killed?); "
            "forgotten, so the last process using it stops it again",
            ", ".join(map(str, dead)),
        )
    return dead


def _process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _process_start_time(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch (to within a second: the boot
    time is whole seconds); None if unknown."""
    try:
        # fields after the command name (which may hold spaces and parentheses); the
        # 22nd field of the line, starttime, is the 20th of them: clock ticks after boot
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _server_answers(socket_dir: str, port: str) -> bool:
    """Whether something accepts connections on the server's Unix socket."""
    if not socket_dir or not port.isdigit():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(Path(socket_dir) / f".s.PGSQL.{port}"))
        except OSError:
            return False
    return True


def clear_stale_pid_file(pgdata: Path) -> bool:
    """Remove a ``postmaster.pid`` (and the socket lock file beside it) left by a server
    that is gone, when its pid now belongs to a process that is not PostgreSQL and started
    after that server, and nothing answers on the server's socket; True if removed. A dead
    pid needs nothing (PostgreSQL replaces such a file itself); a live ``postgres``
    process is a running server, reused as it is; an older process means another pid
    namespace, whose server may be running: the file is left, as PostgreSQL would."""
    pid_file = pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return False
    if not lines or not lines[0].strip().isdigit():
        return False
    pid = int(lines[0])
    if not process_exists(pid):
        return False
    name = _process_name(pid)
    if name is None or name in ("postgres", "postmaster"):
        return False
    if len(lines) < 3 or not lines[2].strip().isdigit():
        return False
    started = _process_start_time(pid)
    if started is None or started + 1 < int(lines[2]):
        # this process is older than the server that wrote the file, so it did not get
        # the pid after that server died: the file comes from another pid namespace (a
        # container sharing data_dir), whose server may well be alive. Removing its lock
        # file would let a second server start on the same data (PostgreSQL refuses
        # that for any live pid) and makes the live one shut itself down.
        return False
    if len(lines) >= 5 and _server_answers(lines[4].strip(), lines[3].strip()):
        return False  # a server accepts connections on the socket: it is alive
    # lines: pid, data dir, start time, port, socket directory, ... (PostgreSQL's layout)
    stale = [pid_file]
    if len(lines) >= 5 and lines[3].strip().isdigit() and lines[4].strip():
        socket_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
        try:
            if socket_lock.read_text().splitlines()[:1] == [str(pid)]:
                stale.append(socket_lock)
        except OSError:
            pass
    for path in stale:
        path.unlink(missing_ok=True)
    log.warning(
        "embedded PostgreSQL: %s named process %d (%s), which is not PostgreSQL: left by "
        "a server that did not stop cleanly; removed %s",
        pid_file,
        pid,
        name,
        ", ".join(str(p) for p in stale),
    )
    return True
