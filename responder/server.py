"""Running the responder: the OCSP listener and the admin listener in one event loop.

The OCSP port runs the native HTTP/1.1 server (responder/ocsp_http.py) by default; the
admin API runs on uvicorn.

With ``serve --workers N`` (responder/workers.py) each worker runs ``serve`` on the
listening socket the supervisor bound; only worker 0 runs the admin listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Generator

import uvicorn

from responder.admin_app import create_admin_app
from responder.admin_tls import admin_ssl_options
from responder.background import BackgroundTasks
from responder.config import Config, ConfigError
from responder.ct_coverage import CTCoverageMonitor
from responder.ct_indexer import BackgroundFollower, CTIndexer
from responder.loop_watchdog import LoopHeartbeat
from responder.ocsp_app import OCSPApp
from responder.ocsp_endpoint import OCSPEndpoint
from responder.ocsp_http import OCSPHttpServer
from responder.service import ResponderService
from responder.workers import SIGHUP_IGNORED

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn server whose signals we handle ourselves (two servers share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


#: seconds uvicorn's listeners (the admin API) give requests in progress at shutdown:
#: without a bound one client stalled mid-request (a body that never finishes) held
#: SIGTERM for ever. Below the supervisor's 15 s (responder/workers.py), which then
#: kills, and systemd's TimeoutStopSec (docs/deploy.md).
UVICORN_SHUTDOWN_GRACE = 10
#: seconds between flushes of the hot path's local counters into the prometheus metrics
STATS_FLUSH_INTERVAL = 1.0


async def _flush_stats(endpoint: OCSPEndpoint, parent: int | None) -> None:
    """Flush metrics each second; a worker also exits when its supervisor is gone."""
    while True:
        await asyncio.sleep(STATS_FLUSH_INTERVAL)
        endpoint.stats.flush()
        if parent is not None and os.getppid() != parent:
            log.error("supervisor %d is gone: worker exiting", parent)
            os.kill(os.getpid(), signal.SIGTERM)


def build_ocsp_endpoint(service: ResponderService) -> OCSPEndpoint:
    async def health(path: bytes) -> tuple[int, bytes]:
        if path == b"/healthz":
            return 200, b"ok\n"
        ok, detail = await service.ready()
        return (200 if ok else 503), detail.encode() + b"\n"

    return OCSPEndpoint(
        service.chain,
        path_prefix=service.config.path_prefix,
        max_age=service.config.max_age,
        health=health,
    )


def build_ocsp_app(service: ResponderService) -> OCSPApp:
    """The endpoint as an ASGI app (``ocsp_http_server = "uvicorn"``, and the fuzz tests)."""
    return OCSPApp(build_ocsp_endpoint(service))


async def serve(
    config: Config,
    *,
    ready: asyncio.Event | None = None,
    listen_socket: socket.socket | None = None,
    worker_index: int = 0,
    supervisor: int | None = None,
    heartbeat_fd: int | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (on ``listen_socket`` when a supervisor bound it)."""
    primary = worker_index == 0
    if primary and config.admin_listen is not None and not config.admin_token:
        raise ConfigError(
            "admin_listen is set but no admin token is configured: set admin_token_file "
            '(or OCSP_RESPONDER_ADMIN_TOKEN), or set admin_listen = "" to disable the admin API'
        )
    service = ResponderService(config, primary=primary)
    await service.start()
    # watched from here on, once keys are loaded and the database connected: the warm-up
    # and the listeners run in the loop, which yields between batches and requests
    heartbeat = LoopHeartbeat(config.worker_hang_timeout.total_seconds(), pipe_fd=heartbeat_fd)
    heartbeat.start(asyncio.get_running_loop())
    try:
        # once per deployment, not per worker: worker 0 follows CT
        follower = _ct_follower(config, service) if primary else None
    except ConfigError:
        heartbeat.stop()
        await service.close()
        raise
    background = BackgroundTasks(service)
    await background.start()
    coverage = _ct_coverage(config, service) if primary else None
    service.start_warmup()
    host, port = config.listen
    common = {
        "lifespan": "off",
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
        "log_config": None,
        "http": "httptools",
        "loop": "uvloop",
        "timeout_graceful_shutdown": UVICORN_SHUTDOWN_GRACE,
    }
    endpoint = build_ocsp_endpoint(service)
    # the OCSP port: the native HTTP/1.1 server, or uvicorn over the ASGI adapter
    native = (
        OCSPHttpServer(
            endpoint,
            keep_alive_timeout=config.ocsp_keep_alive_timeout.total_seconds(),
            request_timeout=config.ocsp_request_read_timeout.total_seconds(),
        )
        if config.ocsp_http_server == "native"
        else None
    )
    servers: list[_Server] = []
    admin_server: _Server | None = None
    if native is None:
        app = OCSPApp(endpoint)
        keep_alive = max(1, round(config.ocsp_keep_alive_timeout.total_seconds()))
        servers.append(
            _Server(
                uvicorn.Config(app, host=host, port=port, timeout_keep_alive=keep_alive, **common)  # type: ignore[arg-type]
            )
        )
    if primary and config.admin_listen is not None and config.admin_token:
        admin = create_admin_app(
            token=config.admin_token,
            registry=service.registry,
            recorder=service.recorder,
            revoker=service.revoker,
            cache=service.cache,
            readiness=service.readiness,
        )
        ahost, aport = config.admin_listen
        tls = admin_ssl_options(config)
        admin_server = _Server(uvicorn.Config(admin, host=ahost, port=aport, **common, **tls))  # type: ignore[arg-type]
        servers.append(admin_server)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, ignore_sighup)
    tasks: list[asyncio.Task[None]] = []
    try:
        if follower is not None:
            follower.start()
        if coverage is not None:
            coverage.start()
        if native is not None:
            try:
                await native.start(host, port, sock=listen_socket)
            except OSError as exc:  # name the key: "Name or service not known" alone does not
                raise OSError(f"listen {host}:{port}: {exc.strerror or exc}") from exc
        for index, server in enumerate(servers):
            on_listen_socket = index == 0 and native is None
            sockets = [listen_socket] if on_listen_socket and listen_socket is not None else None
            tasks.append(asyncio.create_task(_serve_listener(server, sockets)))
        flusher = asyncio.create_task(_flush_stats(endpoint, supervisor))
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        if all(s.started for s in servers):
            log.info(
                "worker %d serving OCSP on http://%s:%d%s/ (admin API: %s)",
                worker_index,
                host,
                port,
                config.path_prefix,
                _admin_url(config, admin_server)
                if admin_server is not None
                else "disabled"
                if primary
                else "in worker 0",
            )
            if ready is not None:
                ready.set()
            stopped = asyncio.create_task(stopping.wait())
            await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
        stop()
        if native is not None:
            await native.close()
        await asyncio.gather(*tasks)
        flusher.cancel()
        endpoint.stats.flush()
        for server in servers:
            if not server.started:
                key = "admin_listen" if server is admin_server else "listen"
                raise OSError(
                    f"{key} {server.config.host}:{server.config.port}: failed to start "
                    "(the reason is logged above)"
                )
    finally:
        stop()
        if native is not None:
            await native.close()
        await background.stop()
        if coverage is not None:
            await coverage.stop()
        if follower is not None:
            await follower.stop()
        await service.close()
        heartbeat.stop()


def ignore_sighup() -> None:
    """SIGHUP is no reload here, and its default action killed the process at once:
    a worker mid-answer (the whole set then restarted), or a supervisor whose workers
    were left orphaned, its metrics directory behind. A `kill -HUP` meant as a reload
    would stop the service (systemd counts death by SIGHUP as clean: no restart)."""
    log.warning(SIGHUP_IGNORED)


async def _serve_listener(server: _Server, sockets: list[socket.socket] | None) -> None:
    """Run one uvicorn listener. uvicorn calls sys.exit() when it cannot bind; that
    SystemExit escaped our event loop as a traceback (exit 3). Here it ends the task, and
    ``serve`` reports the listener that did not start in one line."""
    with contextlib.suppress(SystemExit):
        await server.serve(sockets=sockets)


def _admin_url(config: Config, server: _Server) -> str:
    """Where the admin API listens: the port it really got (``admin_listen`` may say 0)."""
    assert config.admin_listen is not None
    host, port = config.admin_listen
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            port = sock.getsockname()[1]
    return f"{'https' if config.admin_tls_cert else 'http'}://{host}:{port}"


def _ct_follower(config: Config, service: ResponderService) -> BackgroundFollower | None:
    """The CT follower task, when ``ct_follow_in_serve`` is on and logs are configured."""
    if not (config.ct_follow_in_serve and config.ct_logs):
        return None
    indexer = CTIndexer.from_config(config, service.registry, service.store.pool)
    return BackgroundFollower(indexer)


def _ct_coverage(config: Config, service: ResponderService) -> CTCoverageMonitor | None:
    """The CT follower's progress and open gaps as metrics, when CT logs are configured
    (whichever process follows them: this one, or ``ct-follow`` beside it)."""
    if not config.ct_logs:
        return None
    if not config.ct_follow_in_serve:
        log.info(
            "CT logs are followed by `ocsp-responder ct-follow`, not by serve "
            "(ct_follow_in_serve = false): run it beside serve (docs/deploy.md)"
        )
    return CTCoverageMonitor(
        service.store.pool,
        config.ct_logs,
        service.registry,
        interval=config.health_check_interval.total_seconds(),
        expired_retention=config.expired_retention,
    )
