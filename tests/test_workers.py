"""`serve --workers N`: several processes on one port, admin API once, SIGTERM stops all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from responder.embedded_db import process_exists as alive
from tests.support import (
    VENV_BIN,
    IssuerFiles,
    ResponderProcess,
    build_request,
    check_response,
    get_url,
    write_config,
)


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.fixture
def two_workers(database: str, p256_issuer: IssuerFiles, tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = write_config(tmp_path, database, [p256_issuer], extra="workers = 2")
    proc.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    (tmp_path / "metrics").mkdir()
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def wait_for_workers(proc: ResponderProcess, n: int) -> list[int]:
    assert proc.proc is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = worker_pids(proc.proc.pid)
        if len(pids) == n:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"expected {n} workers, have {worker_pids(proc.proc.pid)}")


def wait_for_admin(proc: ResponderProcess) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(proc.admin_url + "/", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("worker 0's admin API did not start")


def test_two_workers_answer_and_share_the_port(two_workers, p256_issuer, tmp_path):  # type: ignore[no-untyped-def]
    workers = wait_for_workers(two_workers, 2)
    wait_for_admin(two_workers)  # /healthz may come from worker 1 before worker 0 is up
    cert = p256_issuer.ca.issue_leaf("workers.test")
    assert two_workers.record(cert).status_code == 201  # the admin API runs (in worker 0)
    der = build_request(cert, p256_issuer.ca.ca_cert)
    bodies = set()
    for _ in range(30):  # a new connection each time: the kernel picks a worker
        resp = httpx.get(get_url(two_workers.url, der), headers={"Connection": "close"})
        assert resp.status_code == 200
        bodies.add(resp.content)
        resp = httpx.post(
            two_workers.url + "/",
            content=der,
            headers={"Content-Type": "application/ocsp-request", "Connection": "close"},
        )
        assert resp.status_code == 200
        bodies.add(resp.content)
    assert len(bodies) == 1  # every worker serves the same pre-signed bytes
    check_response(bodies.pop(), issuer=p256_issuer, serial=cert.serial_number)
    # both workers run with the multiprocess metrics directory the deployment set
    files = os.listdir(tmp_path / "metrics")
    assert {pid for pid in workers if any(name.endswith(f"_{pid}.db") for name in files)} == set(
        workers
    )
    # each worker has its own listening socket on the port (SO_REUSEPORT): the kernel
    # spreads connections over them, so both answered some of the 60 connections
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # counters reach the files once a second
        answered = {pid: answered_by(tmp_path / "metrics", pid) for pid in workers}
        if sum(answered.values()) >= 60:
            break
        time.sleep(0.2)
    assert sum(answered.values()) >= 60 and all(answered.values()), answered
    # only one admin listener: a second one would have failed to bind and killed its worker
    assert all(alive(pid) for pid in workers)


def answered_by(metrics_dir: Path, pid: int) -> float:
    """The OCSP answers one worker counted, read from its multiprocess counter file."""
    path = metrics_dir / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    total = 0.0
    for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
        if json.loads(key)[1] == "ocsp_requests_total":
            total += value
    return total


def test_sigterm_stops_every_worker(two_workers):  # type: ignore[no-untyped-def]
    workers = wait_for_workers(two_workers, 2)
    assert two_workers.proc is not None
    two_workers.proc.send_signal(signal.SIGTERM)
    assert two_workers.proc.wait(20) == 0
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
    with pytest.raises(httpx.HTTPError):
        httpx.get(two_workers.url + "/healthz", timeout=1)


def test_a_dead_worker_stops_the_set(two_workers):  # type: ignore[no-untyped-def]
    """A half-running set (e.g. without worker 0's admin API) is worse than a restart."""
    workers = wait_for_workers(two_workers, 2)
    assert two_workers.proc is not None
    os.kill(workers[1], signal.SIGKILL)
    assert two_workers.proc.wait(20) == 1
    assert not alive(workers[0])


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled sample in an exposition text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("workers", [2, 1])
def test_samples_a_killed_run_left_in_the_metrics_directory_are_dropped(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path, workers: int
) -> None:
    """A PROMETHEUS_MULTIPROC_DIR that outlives the set (a Kubernetes emptyDir across a
    container restart, a directory the operator made) kept the samples of a set that was
    killed: the dead workers' ocsp_ready 0 held min(ocsp_ready) at 0 (a "not ready" page
    for good), and their counters were added to the new ones. The supervisor (or `serve`
    alone) now empties the directory before it starts the workers."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    first = write_config(tmp_path, database, [p256_issuer], extra="workers = 2")
    first.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    first.start()
    wait_for_workers(first, 2)
    wait_for_admin(first)  # a set of two, then one set of `workers`
    for _ in range(5):  # counted by the first set, which then dies without a word
        httpx.get(first.url + "/", headers={"Connection": "close"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if "ocsp_requests_total" in httpx.get(first.admin_url + "/metrics").text:
            break
        time.sleep(0.2)
    assert first.proc is not None
    for pid in [*worker_pids(first.proc.pid), first.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    first.proc.wait()
    assert any(name.startswith("gauge_livemin_") for name in os.listdir(metrics_dir))

    second = write_config(
        tmp_path,
        database,
        [p256_issuer],
        extra=f'workers = {workers}\nhealth_check_interval = "1s"',
    )
    second.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    second.start()
    try:
        assert second.proc is not None
        if workers > 1:
            wait_for_workers(second, workers)
        wait_for_admin(second)
        deadline = time.monotonic() + 15
        while True:  # each worker's monitor checks readiness every second
            text = httpx.get(second.admin_url + "/metrics").text
            if metric_value(text, "ocsp_ready") == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert metric_value(text, "ocsp_ready") == 1, text
        assert 'ocsp_requests_total{method="GET"' not in text  # the dead set's answers
        # a sum over the workers: 10 pooled connections each, not the dead ones' too
        max_pool = f'ocsp_db_pool_connections{{pool="main",state="max"}} {10.0 * workers}'
        assert max_pool in text, text
    finally:
        second.stop()


def test_sighup_neither_kills_the_supervisor_nor_a_worker(two_workers):  # type: ignore[no-untyped-def]
    """SIGHUP's default action killed at once: the supervisor left its workers orphaned
    (they exited a second later, unsupervised) and a worker died mid-answer, restarting
    the set. There is no reload: SIGHUP is logged and ignored, SIGTERM still stops."""
    workers = wait_for_workers(two_workers, 2)
    wait_for_admin(two_workers)
    deadline = time.monotonic() + 20  # both loops run (start-up: the test below)
    while "worker 1 serving" not in two_workers.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    before = two_workers.log().count("SIGHUP ignored")
    assert two_workers.proc is not None
    two_workers.proc.send_signal(signal.SIGHUP)
    os.kill(workers[1], signal.SIGHUP)
    deadline = time.monotonic() + 10
    while two_workers.log().count("SIGHUP ignored") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # an orphaned worker noticed its supervisor gone within a second
    assert two_workers.log().count("SIGHUP ignored") == before + 2, two_workers.log()
    assert two_workers.proc.poll() is None
    assert all(alive(pid) for pid in workers)
    assert httpx.get(two_workers.url + "/healthz", headers={"Connection": "close"}).is_success
    two_workers.proc.send_signal(signal.SIGTERM)
    assert two_workers.proc.wait(20) == 0


def test_sighup_during_start_up_kills_nothing(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """A SIGHUP that reached a process before its event loop's handler took its default
    action: a worker still importing died, and the supervisor stopped the set (a
    supervisor still spawning died too). Each worker is sent one as soon as it exists,
    the supervisor when its first worker does."""
    proc = write_config(tmp_path, database, [p256_issuer], extra="workers = 2")
    env = {**os.environ, **proc.env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    log = open(tmp_path / "start.log", "wb")
    supervisor = subprocess.Popen(
        [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(proc.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        hupped: set[int] = set()
        deadline = time.monotonic() + 20
        while len(hupped) < 2 and time.monotonic() < deadline and supervisor.poll() is None:
            for pid in set(worker_pids(supervisor.pid)) - hupped:
                os.kill(pid, signal.SIGHUP)  # within milliseconds of its exec
                if not hupped:  # and the supervisor, while it spawns
                    supervisor.send_signal(signal.SIGHUP)
                hupped.add(pid)
            time.sleep(0.005)
        assert len(hupped) == 2, (tmp_path / "start.log").read_text()
        deadline = time.monotonic() + 20
        while (tmp_path / "start.log").read_text().count(" serving OCSP on ") < 2:
            assert supervisor.poll() is None, (tmp_path / "start.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "start.log").read_text()
            time.sleep(0.05)
        assert all(alive(pid) for pid in hupped) and supervisor.poll() is None
        assert httpx.get(proc.url + "/healthz", headers={"Connection": "close"}).is_success
    finally:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(20) == 0
        log.close()


def test_a_stalled_admin_request_does_not_hold_sigterm(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """uvicorn waited without bound for the admin API's requests in progress: one client
    stalled in the middle of its body kept `serve` from stopping on SIGTERM for ever
    (systemd then SIGKILLed it; the supervisor of --workers killed worker 0 at 15 s)."""
    proc = write_config(tmp_path, database, [p256_issuer]).start()
    wait_for_admin(proc)
    with socket.create_connection(("127.0.0.1", proc.admin_port)) as stalled:
        stalled.sendall(
            b"POST /v1/certificates HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer "
            + proc.token.encode()
            + b"\r\nContent-Length: 1000\r\n\r\n"
            + b"x" * 10
        )
        time.sleep(0.3)  # received: a request in progress
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        try:
            assert proc.proc.wait(20) == 0  # was: still running
        finally:
            proc.stop(signal.SIGKILL)


def test_an_unusable_metrics_directory_is_one_line_a_missing_one_is_created(
    database: str, p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """prometheus-client opens its files in PROMETHEUS_MULTIPROC_DIR at import: a missing
    or unwritable directory ended `serve` in a traceback from inside the library."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = write_config(tmp_path, database, [p256_issuer], extra="workers = 2")
    failed = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(proc.config_path)],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(not_a_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"ocsp-responder: error: PROMETHEUS_MULTIPROC_DIR {not_a_dir}: not a writable "
        "directory (File exists)"
    ]
    missing = tmp_path / "run" / "metrics"
    proc.env["PROMETHEUS_MULTIPROC_DIR"] = str(missing)
    proc.start()
    try:
        wait_for_workers(proc, 2)
        assert missing.is_dir()
    finally:
        proc.stop()


def test_a_worker_failing_at_start_gives_its_exit_status(
    p256_issuer: IssuerFiles, tmp_path: Path
) -> None:
    """`serve` alone exits 3 when the database cannot be reached; with workers the
    supervisor said 1 for every failure, so a unit could not tell it from a bad config."""
    proc = write_config(tmp_path, "postgresql://nobody@127.0.0.1:1/none", [p256_issuer])
    command = [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(proc.config_path)]
    alone = subprocess.run(command, capture_output=True, text=True, timeout=60)
    workers = subprocess.run(
        [*command, "--workers", "2"], capture_output=True, text=True, timeout=60
    )
    assert alone.returncode == workers.returncode == 3, workers.stderr
    assert "ocsp-responder: error: cannot connect to the database" in workers.stderr
