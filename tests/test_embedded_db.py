"""The embedded PostgreSQL (no ``database_url``) after a crash: killed users and stale
pid files must not leave it running forever, nor keep the next start from connecting.

Real pgserver clusters, started by real processes that are killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from responder.embedded_db import process_exists

#: start the embedded cluster under argv[1], connect once, then exit (or SIGKILL itself)
USER = """
import asyncio, os, signal, sys
from pathlib import Path
import asyncpg
from responder.embedded_db import start_embedded_postgres
dsn = start_embedded_postgres(Path(sys.argv[1]))
async def probe():
    conn = await asyncpg.connect(dsn, timeout=10)
    await conn.close()
asyncio.run(probe())
print(dsn, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "wait":
    sys.stdin.readline()
"""


def use_cluster(data_dir: Path, how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", USER, str(data_dir), how],
        capture_output=True,
        text=True,
        timeout=120,
    )


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None


def running(pid: int | None) -> bool:
    return pid is not None and process_exists(pid)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    pid = postmaster_pid(tmp_path / "postgres")
    if running(pid):  # a test that failed left it running
        assert pid is not None
        os.kill(pid, signal.SIGQUIT)


def test_a_killed_user_does_not_keep_the_cluster_running_forever(data_dir: Path) -> None:
    pgdata = data_dir / "postgres"
    killed = use_cluster(data_dir, "kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    server = postmaster_pid(pgdata)
    assert running(server)  # nobody stopped it: expected after a SIGKILL
    assert len(json.loads((pgdata / ".handle_pids.json").read_text())) == 1  # the dead pid
    clean = use_cluster(data_dir, "exit")
    assert clean.returncode == 0, clean.stderr
    assert "exited without stopping it" in clean.stderr
    # the clean exit was the last user: the cluster is stopped (it stayed up for good)
    deadline = time.monotonic() + 10
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(server)
    assert json.loads((pgdata / ".handle_pids.json").read_text()) == []


def test_the_last_user_stops_the_cluster_though_another_was_killed(data_dir: Path) -> None:
    """``serve --workers 2`` on the embedded cluster: worker 1 is killed, the supervisor
    stops worker 0, which exits cleanly as the last live user. Its pgserver cleanup still
    saw the killed worker's pid in the list and left the cluster running after the whole
    set had stopped (until some later start). The exit now forgets dead users first."""
    pgdata = data_dir / "postgres"
    survivor = subprocess.Popen(
        [sys.executable, "-c", USER, str(data_dir), "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert survivor.stdout is not None and survivor.stdout.readline()  # connected
        killed = use_cluster(data_dir, "kill")
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        server = postmaster_pid(pgdata)
        assert running(server)
        _, err = survivor.communicate("exit\n", timeout=60)
        assert survivor.returncode == 0, err
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()
    deadline = time.monotonic() + 10
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(server)


def test_a_pid_file_naming_another_process_is_cleared(data_dir: Path) -> None:
    """After a crash the dead server's pid may belong to another program (a container
    restart hands out the same low pids): pgserver took the server for running."""
    pgdata = data_dir / "postgres"
    assert use_cluster(data_dir, "kill").returncode == -signal.SIGKILL
    server = postmaster_pid(pgdata)
    assert server is not None
    children = Path(f"/proc/{server}/task/{server}/children").read_text().split()
    os.kill(server, signal.SIGKILL)  # the server dies too: a crash leaves both lock files
    deadline = time.monotonic() + 20  # its children notice the postmaster's death and exit
    while any(map(running, [server, *map(int, children)])) and time.monotonic() < deadline:
        time.sleep(0.1)
    other = subprocess.Popen(["sleep", "60"])
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        socket_lock = Path(lines[4]) / f".s.PGSQL.{lines[3]}.lock"
        for lock in (pgdata / "postmaster.pid", socket_lock):
            text = lock.read_text().splitlines()
            assert text[0] == str(server)
            lock.write_text("\n".join([str(other.pid), *text[1:]]) + "\n")
        result = use_cluster(data_dir, "exit")
        assert result.returncode == 0, result.stderr  # was: Connection refused, every time
        assert f"named process {other.pid} (sleep), which is not PostgreSQL" in result.stderr
        assert not running(postmaster_pid(pgdata))  # and stopped again at its exit
    finally:
        other.kill()
        other.wait()


def test_a_torn_user_list_is_reset(data_dir: Path) -> None:
    pgdata = data_dir / "postgres"
    assert use_cluster(data_dir, "exit").returncode == 0
    (pgdata / ".handle_pids.json").write_text("[12")  # a crash in the middle of a write
    result = use_cluster(data_dir, "exit")
    assert result.returncode == 0, result.stderr
    dsn = result.stdout.strip()

    async def refused() -> None:  # stopped at exit, as a clean run does
        with pytest.raises(OSError):
            await asyncpg.connect(dsn, timeout=5)

    asyncio.run(refused())


def test_a_live_server_seen_from_another_pid_namespace_keeps_its_pid_file(
    data_dir: Path,
) -> None:
    """A container sharing data_dir sees the running server's pid as whatever process
    has that pid here: one older than the server cannot have got the pid after it died,
    so the server may be alive. Removing its postmaster.pid let a second server start on
    the same data (and makes the live one shut itself down at its next lock check)."""
    pgdata = data_dir / "postgres"
    older = subprocess.Popen(["sleep", "300"])  # a process that predates the server
    time.sleep(2.5)  # start times are compared to the second
    try:
        assert use_cluster(data_dir, "kill").returncode == -signal.SIGKILL
        server = postmaster_pid(pgdata)
        assert running(server)
        pid_file = pgdata / "postmaster.pid"
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(older.pid), *lines[1:]]) + "\n")
        try:
            result = use_cluster(data_dir, "kill")
            assert "which is not PostgreSQL" not in result.stderr, result.stderr
            assert pid_file.read_text().splitlines() == [str(older.pid), *lines[1:]]
            assert running(server)
        finally:
            if pid_file.exists():  # give the fixture the real server to stop
                rest = pid_file.read_text().splitlines()[1:]
                pid_file.write_text("\n".join([str(server), *rest]) + "\n")
    finally:
        older.kill()
        older.wait()
