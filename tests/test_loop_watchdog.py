"""A serve process or worker whose event loop is blocked is ended, not left hoarding connections.

A worker alive with its loop blocked kept accepting its share of new connections, which
waited until the relying parties timed out; nothing noticed. The loop is blocked through
tests/loop_block_hook (test-only, loaded through PYTHONPATH) on SIGUSR2.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from responder.embedded_db import process_exists as alive
from tests.support import IssuerFiles, ResponderProcess, build_request, get_url, write_config
from tests.test_workers import wait_for_admin, wait_for_workers, worker_pids

HOOK_DIR = Path(__file__).parent / "loop_block_hook"
#: the smallest worker_hang_timeout the configuration allows
TIMEOUT = 5
#: the supervisor's margin over a worker's own watchdog (responder/loop_watchdog.py)
SUPERVISOR_MARGIN = 2
#: exit status of a process ended for a blocked loop (responder/loop_watchdog.py)
HUNG_EXIT_STATUS = 4


def responder(
    database: str, issuer: IssuerFiles, tmp_path: Path, workers: int, block_mode: str | None
) -> ResponderProcess:
    proc = write_config(tmp_path, database, [issuer], extra=f"workers = {workers}")
    # through the environment, which code from before the key ignores: the tests then
    # fail there on what they check, not on an unknown key
    proc.env["OCSP_RESPONDER_WORKER_HANG_TIMEOUT"] = f"{TIMEOUT}s"
    # under tmp_path: a supervisor killed by the cleanup leaves nothing in /tmp
    proc.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    if block_mode is not None:
        proc.env["PYTHONPATH"] = str(HOOK_DIR)
        proc.env["OCSP_TEST_BLOCK_LOOP_ON_SIGUSR2"] = block_mode
    return proc


def wait_exit(proc: ResponderProcess, seconds: float) -> int | None:
    assert proc.proc is not None
    deadline = time.monotonic() + seconds
    while proc.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.proc.poll()


def wait_serving(proc: ResponderProcess, index: int) -> None:
    """Until worker ``index`` logs that it serves (its loop runs, the hook is installed)."""
    deadline = time.monotonic() + 20
    while f"worker {index} serving OCSP" not in proc.log():
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.05)


def kill_all(proc: ResponderProcess, pids: list[int]) -> None:
    """Stop, and leave nothing behind when an assertion failed (the old code's blocked
    worker sleeps for 600 s and ignores SIGTERM)."""
    proc.stop()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("mode", "line"),
    [
        # the worker's own watchdog thread: it runs while the loop sleeps
        ("sleep", r"event loop of pid {pid} blocked for ([\d.]+)s"),
        # a hang that holds the GIL stops that thread too: the supervisor kills the worker
        ("hold-gil", r"worker 1 \(pid {pid}\): event loop silent for ([\d.]+)s"),
    ],
)
def test_a_worker_with_a_blocked_loop_is_ended_and_the_set_exits(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path, mode: str, line: str
) -> None:
    proc = responder(database, p256_issuer, tmp_path, 2, mode).start()
    assert proc.proc is not None
    pids = wait_for_workers(proc, 2)
    try:
        wait_serving(proc, 1)
        os.kill(pids[1], signal.SIGUSR2)
        status = wait_exit(proc, TIMEOUT + SUPERVISOR_MARGIN + 15)
        assert status == HUNG_EXIT_STATUS, proc.log()  # was: still running
        match = re.search(line.format(pid=pids[1]), proc.log())
        assert match, proc.log()
        silent = float(match[1])
        limit = TIMEOUT + (SUPERVISOR_MARGIN if mode == "hold-gil" else 0)
        assert limit <= silent <= limit + 1.5, proc.log()  # within the timeout + a second
        assert "stopping all workers" in proc.log()
        assert not any(alive(pid) for pid in pids)  # no orphans: worker 0 was stopped too
    finally:
        kill_all(proc, pids)


def test_plain_serve_with_a_blocked_loop_exits(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """Without a supervisor nothing else would notice: the watchdog thread ends `serve`
    with a status of its own, and the service manager restarts it."""
    proc = responder(database, p256_issuer, tmp_path, 1, "sleep").start()
    assert proc.proc is not None
    try:
        wait_serving(proc, 0)
        proc.proc.send_signal(signal.SIGUSR2)
        assert wait_exit(proc, TIMEOUT + 15) == HUNG_EXIT_STATUS, proc.log()
        match = re.search(rf"event loop of pid {proc.proc.pid} blocked for ([\d.]+)s", proc.log())
        assert match and TIMEOUT <= float(match[1]) <= TIMEOUT + 1.5, proc.log()
    finally:
        kill_all(proc, [])


def test_a_busy_healthy_set_is_never_killed(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """Requests keep both loops busy for longer than the timeout: the beats still come
    (a timer each second, between requests), so no worker is taken for hung."""
    proc = responder(database, p256_issuer, tmp_path, 2, None).start()
    assert proc.proc is not None
    pids = wait_for_workers(proc, 2)
    try:
        wait_for_admin(proc)
        cert = p256_issuer.ca.issue_leaf("busy.test")
        assert proc.record(cert).status_code == 201
        url = get_url(proc.url, build_request(cert, p256_issuer.ca.ca_cert))
        end = time.monotonic() + TIMEOUT + SUPERVISOR_MARGIN + 1

        def client() -> int:
            answered = 0
            with httpx.Client() as http:
                while time.monotonic() < end:
                    assert http.get(url, headers={"Connection": "close"}).status_code == 200
                    answered += 1
            return answered

        with ThreadPoolExecutor(4) as pool:
            answered = sum(pool.map(lambda _: client(), range(4)))
        assert answered >= 300
        assert proc.proc.poll() is None, proc.log()
        assert worker_pids(proc.proc.pid) == pids
        assert "silent for" not in proc.log() and "blocked for" not in proc.log()
    finally:
        kill_all(proc, pids)
