"""Throwaway PostgreSQL clusters for tests: real servers, started and stopped here.

Uses the PostgreSQL binaries found on the machine (``$PG_BINDIR``, Debian's
/usr/lib/postgresql/<v>/bin, or the ones the pgserver wheel ships). As root, the server
runs as an unprivileged system user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def find_bindir() -> Path:
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


#: every port ``free_port`` (or ``claim_port``) handed out in this process
_handed_out: set[int] = set()


def claim_port(port: int) -> bool:
    """True (and remembered) if ``port`` was never handed out before in this process."""
    if port in _handed_out:
        return False
    _handed_out.add(port)
    return True


def free_port() -> int:
    """A free loopback port, never one handed out before in this process.

    The probe socket is closed before the port's user binds it, and the kernel hands a
    port just released to the next probe again about once in 20,000 calls: a responder's
    OCSP and admin ports (two calls in a row) were then the same, and it failed to start.
    """
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if claim_port(port):
            return port
    raise RuntimeError(f"no free loopback port left that was not handed out ({len(_handed_out)})")


def _run_as_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "pgtest"], check=True)
    return "pgtest"


class PgCluster:
    """One PostgreSQL server on 127.0.0.1:<port>, superuser ``postgres`` (trust auth)."""

    def __init__(self, settings: dict[str, str] | None = None, base: Path | None = None) -> None:
        self.bindir = find_bindir()
        self.user = _run_as_user()
        self.root = Path(tempfile.mkdtemp(prefix="ocsp-pg-", dir=base))
        self.datadir = self.root / "data"
        self.port = free_port()
        self.settings = {
            "max_connections": "300",
            "shared_buffers": "128MB",
            "fsync": "off",
            "full_page_writes": "off",
            "unix_socket_directories": str(self.root),
            "listen_addresses": "127.0.0.1",
            **(settings or {}),
        }
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.root, info.pw_uid, info.pw_gid)
            os.chmod(self.root, 0o755)

    def _cmd(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}\n{result.stderr}")
        return result.stdout

    def init(self) -> PgCluster:
        self._cmd("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\n")
            for key, value in self.settings.items():
                conf.write(f"{key} = '{value}'\n")
        return self

    def start(self) -> PgCluster:
        self._cmd("pg_ctl", "-D", str(self.datadir), "-l", str(self.root / "log"), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._cmd("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def server_pids(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, walwriter...)."""
        postmaster = int((self.datadir / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        return [postmaster, *map(int, children)]

    def signal_all(self, pids: list[int], sig: signal.Signals) -> None:
        """Send ``sig`` to ``pids`` (from ``server_pids``): SIGSTOP hangs the server the
        way a stalled disk or a partition does, SIGCONT resumes it."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._cmd(
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        )

    def make_replica(self) -> PgCluster:
        """A streaming replica of this (running) cluster: pg_basebackup -R, own port.

        The replica replays the primary's WAL continuously (standby.signal); pause it with
        ``pause_replay()`` to simulate replica lag.
        """
        replica = PgCluster(self.settings, base=self.root.parent)
        replica.settings = {**self.settings, "unix_socket_directories": str(replica.root)}
        replica._cmd(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-D",
            str(replica.datadir),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        with open(replica.datadir / "postgresql.conf", "a") as conf:
            conf.write(f"port = {replica.port}\n")
            conf.write(f"unix_socket_directories = '{replica.root}'\n")
            conf.write("hot_standby = on\nhot_standby_feedback = on\n")
        return replica

    def pause_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_resume()")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.psql("SELECT 1")
                return
            except RuntimeError:
                time.sleep(0.2)
        raise TimeoutError("PostgreSQL did not become ready")


@contextlib.contextmanager
def superuser_dsn(settings: dict[str, str] | None = None) -> Iterator[str]:
    """``$DATABASE_URL`` (a superuser DSN) if set, else a throwaway cluster for the
    duration (benchmarks: measure on a given server, or on one of their own)."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    cluster = PgCluster(settings=settings).init().start()
    try:
        yield cluster.dsn()
    finally:
        cluster.destroy()
