"""The ``ocsp-responder`` command line.

Errors the operator can fix (configuration, a bad file, a refused certificate) print one
clear line to stderr and exit non-zero; no tracebacks for expected failures.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from responder.config import MAX_WORKERS, Config, ConfigError, check_database_url, load_config
from responder.embedded_db import EmbeddedDatabaseError
from responder.schema import SchemaError, migrate
from responder.store import PresignedStore, StoreUnavailable
from signer.response_builder import SigningError

log = logging.getLogger("ocsp_responder")


class CommandError(Exception):
    """A failure to report to the operator as one line, exit status 1."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else None)


def _setup_logging(level: str, log_format: str = "text", sample_every: int | None = None) -> None:
    """Log to stderr as text or JSON lines (``log_format``); see responder/log_format.py."""
    from responder import request_log
    from responder.log_format import QUIET_TRACEBACK_LOGGERS, ExpectedFailureFilter, make_formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    for name in QUIET_TRACEBACK_LOGGERS:
        logging.getLogger(name).addFilter(ExpectedFailureFilter())
    if sample_every is not None:
        request_log.SUCCESS_SAMPLE_EVERY = sample_every


async def _with_service(config: Config):  # type: ignore[no-untyped-def]
    from responder.service import ResponderService

    service = ResponderService(config)
    await service.start(pool_size=4, monitor=False)
    return service


def cmd_serve(args: argparse.Namespace) -> None:
    # SIGHUP is no reload (responder/server.py ignores it once its loop runs); until then
    # its default action killed a process still starting: ignore it from the first line
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = _config(args)
    _setup_logging(config.log_level, config.log_format, config.log_success_sample_every)
    if args.worker_of:  # a worker started by the supervisor (responder/workers.py)
        import socket

        from responder.server import serve

        fd, index, supervisor, heartbeat_fd = (int(part) for part in args.worker_of.split(":"))
        sock = socket.socket(fileno=fd)
        _run_serving(
            serve(
                config,
                listen_socket=sock,
                worker_index=index,
                supervisor=supervisor,
                heartbeat_fd=heartbeat_fd,
            )
        )
        return
    workers = args.workers if args.workers is not None else config.workers
    if not 1 <= workers <= MAX_WORKERS:  # the bound of the workers key (config.py)
        raise CommandError(f"--workers must be between 1 and {MAX_WORKERS}")
    if workers > 1:
        from responder.workers import run_workers

        raise SystemExit(run_workers(config, workers))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # e.g. the systemd unit of docs/deploy.md
        from responder.workers import remove_stale_samples

        remove_stale_samples(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]), os.getpid())
    from responder.server import serve

    _run_serving(serve(config))


def _run_serving(main: Coroutine[Any, Any, None]) -> None:
    """Serve on uvloop: uvicorn's ``loop="uvloop"`` only applies to loops uvicorn creates,
    and the stock asyncio loop costs the hot path about a third of its throughput."""
    import uvloop

    uvloop.run(main)


def cmd_migrate(args: argparse.Namespace) -> None:
    from responder.service import resolve_database_url

    config = _config(args)
    _setup_logging(config.log_level, config.log_format)
    if args.database_url:
        check_database_url(args.database_url, "--database-url")
    dsn = args.database_url or resolve_database_url(config)
    applied = asyncio.run(migrate(dsn, target=args.target))
    if applied:
        print(f"applied migrations: {', '.join(f'{v:04d}' for v in applied)}")
    else:
        print("schema is up to date")


def cmd_issue(args: argparse.Namespace) -> None:
    from signer.recording import CertificateRejected, format_serial, load_certificates
    from signer.response_builder import CertStatus

    config = _config(args)
    _setup_logging(config.log_level, config.log_format)

    async def run() -> int:
        try:
            service = await _with_service(config)
        except StoreUnavailable as exc:
            # the same per-file verdict as a failure mid-way: no file may be published
            for name in args.files:
                print(f"{name}: NOT recorded (do not publish): {exc}", file=sys.stderr)
            return 3
        failures = 0
        try:
            for position, name in enumerate(args.files):
                try:
                    certs = load_certificates(Path(name).read_bytes())
                    outcomes = await service.recorder.record(certs)
                except OSError as exc:
                    print(f"{name}: cannot read: {exc.strerror}", file=sys.stderr)
                    failures += 1
                    continue
                except CertificateRejected as exc:
                    print(f"{name}: refused: {exc}", file=sys.stderr)
                    failures += 1
                    continue
                except (StoreUnavailable, SigningError) as exc:
                    # an issuer that cannot sign fails like the database: not recorded
                    print(f"{name}: NOT recorded (do not publish): {exc}", file=sys.stderr)
                    for rest in args.files[position + 1 :]:
                        print(f"{rest}: NOT recorded (not attempted)", file=sys.stderr)
                    return 3
                for o in outcomes:
                    kind = "precertificate" if o.precertificate else "certificate"
                    state = "recorded" if o.created else "already recorded"
                    if o.status is not CertStatus.GOOD:  # the stored answer, not "good"
                        state += f", OCSP answers {o.status.name.lower()}"
                    print(f"{name}: {kind} {format_serial(o.serial)} ({o.issuer}): {state}")
        finally:
            await service.close()
        return 1 if failures else 0

    status = asyncio.run(run())
    if status:
        raise SystemExit(status)


def cmd_import(args: argparse.Namespace) -> None:
    from responder.bulk_import import Importer, ImportInputError, ImportJournal, discover
    from responder.progress import ProgressBar

    config = _config(args)
    _setup_logging(config.log_level, config.log_format)
    try:
        files = discover([Path(p) for p in args.paths])
    except ImportInputError as exc:
        raise CommandError(str(exc)) from exc
    journal_path = Path(args.journal) if args.journal else config.data_dir / "import-journal.jsonl"

    async def run() -> int:
        service = await _with_service(config)
        journal = None if args.no_journal else ImportJournal(journal_path)
        if journal is not None and args.restart:
            journal.progress.clear()
        importer = Importer(
            service.recorder, journal, batch_size=args.batch_size, errors=sys.stderr
        )
        progress = None if args.quiet else ProgressBar(0)
        try:
            report = await importer.run(files, progress)
            if report.created:
                await _refresh_statistics(service.store)
        except (StoreUnavailable, SigningError) as exc:
            print(
                f"ocsp-responder: import stopped, the rest is NOT recorded: {exc}; "
                "run the same command again to resume",
                file=sys.stderr,
            )
            return 3
        finally:
            if progress is not None:
                progress.close()
            if journal is not None:
                journal.close()
            await service.close()
        print(
            f"imported {report.created + report.existing} certificates from {report.files} "
            f"files: {report.created} new, {report.existing} already recorded, "
            f"{report.refused} refused, {report.unreadable} unreadable files, "
            f"{report.resumed_past} skipped as done by an earlier run"
        )
        return 0 if report.ok else 1

    status = asyncio.run(run())
    if status:
        raise SystemExit(status)


async def _refresh_statistics(store: PresignedStore) -> None:
    """After an import: ANALYZE, or say why not (the import itself has succeeded)."""
    hint = (
        "until autovacuum does (minutes), lookups may use plans made for smaller tables: "
        "run ANALYZE certificates, responses as their owner after a large import"
    )
    try:
        analyzed = await store.refresh_statistics()
    except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
        print(f"ocsp-responder: ANALYZE failed ({type(exc).__name__}); {hint}", file=sys.stderr)
        return
    if not analyzed:
        print(f"ocsp-responder: this role may not ANALYZE the tables; {hint}", file=sys.stderr)


def cmd_revoke(args: argparse.Namespace) -> None:
    from signer.recording import format_serial, parse_serial
    from signer.response_builder import parse_reason, reason_name
    from signer.revocation import RevocationConflict, RevocationTimeError, parse_revocation_time

    config = _config(args)
    _setup_logging(config.log_level, config.log_format)
    try:
        serial = parse_serial(args.serial)
        reason = parse_reason(args.reason)
        when = parse_revocation_time(args.time) if args.time else None
    except ValueError as exc:
        raise CommandError(str(exc)) from exc

    async def run() -> None:
        service = await _with_service(config)
        try:
            issuer = service.registry.by_name(args.issuer)
            if issuer is None:
                names = ", ".join(i.name for i in service.registry.issuers)
                raise CommandError(f"unknown issuer {args.issuer!r}; configured: {names}")
            try:
                outcome = await service.revoker.revoke(
                    issuer, serial, reason, when, wait_for_cdn=True
                )
            except RevocationTimeError as exc:  # in the future, before the issuer existed
                raise CommandError(str(exc)) from exc
            except RevocationConflict as exc:  # same rule and wording as the admin API's 409
                raise CommandError(f"{format_serial(serial)} ({args.issuer}): {exc}") from exc
            await service.purger.drain()
        finally:
            await service.close()
        if outcome.created:
            state = "revoked"
        elif outcome.updated:
            state = "revocation updated: revoked"
        else:
            state = "was already revoked"
        print(
            f"{format_serial(serial)} ({args.issuer}): {state} at "
            f"{outcome.revocation.revoked_at.isoformat()} "
            f"({reason_name(outcome.revocation.reason)})"
        )
        warning = outcome.warning(args.issuer)
        if warning is not None:
            print(f"{format_serial(serial)} ({args.issuer}): warning: {warning}", file=sys.stderr)

    asyncio.run(run())


def cmd_refresh(args: argparse.Namespace) -> None:
    from responder.background import build_refresher

    config = _config(args)
    _setup_logging(config.log_level, config.log_format)

    async def run() -> None:
        service = await _with_service(config)
        try:
            refresher = build_refresher(service)
            report = await refresher.run_pass()
            fresh = await refresher.sample()
        finally:
            await service.close()
        print(
            f"re-signed {report.total} ({', '.join(f'{k}: {v}' for k, v in report.resigned.items()) or 'nothing due'}); "
            f"still due: {fresh.backlog}; past BR deadline: {fresh.past_deadline}"
        )
        for issuer, problem in report.failures.items():
            print(f"issuer {issuer}: FAILED: {problem}", file=sys.stderr)
        if report.failures:
            raise SystemExit(2)

    asyncio.run(run())


def cmd_demo(args: argparse.Namespace) -> None:
    from responder.demo import run_demo

    _setup_logging("info")
    asyncio.run(
        run_demo(Path(args.data_dir), args.listen, args.admin_listen, serve=not args.no_serve)
    )


def cmd_ct_follow(args: argparse.Namespace) -> None:
    import json
    import signal

    from responder.ct_indexer import BackgroundFollower, CTIndexer

    config = _config(args)
    _setup_logging(config.log_level, config.log_format)
    if not config.ct_logs:
        raise CommandError("no ct_logs configured: add [[ct_logs]] tables (see README)")

    async def run() -> bool:
        service = await _with_service(config)
        try:
            indexer = CTIndexer.from_config(config, service.registry, service.store.pool)
            if args.once:
                results = await indexer.run_once()
                await indexer.aclose()
                for r in results:
                    if args.json:
                        print(json.dumps(r.as_json()))
                    else:
                        lag = "-" if r.lag_seconds is None else f"{r.lag_seconds:.1f}s"
                        state = f"FAILED: {r.error}" if r.error else "ok"
                        print(
                            f"{r.log}: {state}; at {r.next_index}/{r.tree_size}, "
                            f"{r.scanned} entries scanned, {r.indexed} serials indexed, "
                            f"{r.gaps} coverage gaps ({r.repaired} repaired), lag {lag}"
                        )
                return all(r.error is None for r in results)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            follower = BackgroundFollower(indexer)
            follower.start()
            await stop.wait()
            await follower.stop()  # cancels mid-batch safely: the batch is fetched again
            return True
        finally:
            await service.close()

    if not asyncio.run(run()):
        raise SystemExit(1)


def cmd_ct_status(args: argparse.Namespace) -> None:
    from responder.ct_status import collect, exit_status, render_json, render_table
    from responder.service import resolve_database_url

    config = _config(args)
    _setup_logging(config.log_level, config.log_format)
    doc = asyncio.run(collect(config, resolve_database_url(config), counts=args.counts))
    print(render_json(doc) if args.json else render_table(doc))
    status = exit_status(doc)
    if status:
        raise SystemExit(status)


def cmd_audit(args: argparse.Namespace) -> None:
    from responder.audit import load_audit_issuers, load_targets, run_audit
    from responder.service import resolve_database_url

    config = _config(args)
    _setup_logging(config.log_level, config.log_format)
    if args.sample is not None and args.sample < 1:
        raise CommandError("--sample must be at least 1")
    if args.concurrency < 1:
        raise CommandError("--concurrency must be at least 1")
    if not args.url.startswith(("http://", "https://")):
        raise CommandError(f"--url must be an http:// or https:// URL, got {args.url!r}")
    issuers = load_audit_issuers(config)

    async def run() -> str:
        targets = await load_targets(
            resolve_database_url(config),
            issuers,
            args.sample,
            expired_retention=config.expired_retention,
        )
        report = await run_audit(args.url, targets, concurrency=args.concurrency)
        text = report.render_json() if args.json else report.render()
        print(text)
        return "fail" if report.violations else "ok"

    if asyncio.run(run()) != "ok":
        raise SystemExit(1)


def _batch_size(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 10000")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocsp-responder",
        description="OCSP responder serving pre-signed responses from PostgreSQL.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML config file (default: $OCSP_RESPONDER_CONFIG)")
        return p

    p = with_config(sub.add_parser("serve", help="serve OCSP and the admin API"))
    p.add_argument(
        "--workers", type=int, help="worker processes on the OCSP port (default: config workers)"
    )
    p.add_argument("--worker-of", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
    p = with_config(sub.add_parser("migrate", help="create or upgrade the database schema"))
    p.add_argument("--database-url", help="override database_url (e.g. a DDL-capable role)")
    p.add_argument(
        "--target", type=int, help="stop at this schema version (default: the newest known)"
    )
    p.set_defaults(func=cmd_migrate)
    p = with_config(sub.add_parser("issue", help="record certificates/precertificates (PEM/DER)"))
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_issue)
    p = with_config(
        sub.add_parser("import", help="bulk-record PEM/DER files and directories, resumably")
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories (recursive)")
    p.add_argument(
        "--batch-size", type=_batch_size, default=1000, help="certificates per transaction"
    )
    p.add_argument("--journal", help="progress journal (default: <data_dir>/import-journal.jsonl)")
    p.add_argument("--restart", action="store_true", help="ignore earlier progress")
    p.add_argument("--no-journal", action="store_true", help="do not read or write a journal")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)
    p = with_config(sub.add_parser("revoke", help="revoke a serial and re-sign its response"))
    p.add_argument("--issuer", required=True, help="issuer name from the configuration")
    p.add_argument("--serial", required=True, help="serial number in hex")
    p.add_argument("--reason", default="unspecified", help="BR 7.3 reason name or code")
    p.add_argument("--time", help="revocation time, ISO 8601 with zone (default: now)")
    p.set_defaults(func=cmd_revoke)
    p = with_config(sub.add_parser("refresh", help="one refresher pass: re-sign what is due"))
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser("demo", help="demo CA + embedded PostgreSQL + responder, ready for openssl")
    p.add_argument("--data-dir", default="var/demo", help="where the demo keeps its files")
    p.add_argument("--listen", default="127.0.0.1:8080")
    p.add_argument("--admin-listen", default="127.0.0.1:8081")
    p.add_argument("--no-serve", action="store_true", help="set up and exit without serving")
    p.set_defaults(func=cmd_demo)
    p = with_config(sub.add_parser("ct-follow", help="follow the CT logs into the index"))
    p.add_argument("--once", action="store_true", help="catch up once and exit")
    p.add_argument("--json", action="store_true", help="with --once: one JSON line per log")
    p.set_defaults(func=cmd_ct_follow)
    p = with_config(sub.add_parser("ct-status", help="each CT log's position, lag and gaps"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--counts",
        action="store_true",
        help="also count the serials indexed per log (scans the whole CT index)",
    )
    p.set_defaults(func=cmd_ct_status)
    p = with_config(
        sub.add_parser("audit", help="ask the responder about indexed serials, as a client")
    )
    p.add_argument("--url", required=True, help="the responder's OCSP URL (POST)")
    p.add_argument("--sample", type=int, help="audit this many random serials (default: all)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CommandError, SchemaError, EmbeddedDatabaseError) as exc:
        print(f"ocsp-responder: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except StoreUnavailable as exc:
        print(f"ocsp-responder: error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    except SigningError as exc:  # e.g. `revoke` while the issuer's responder cannot sign
        print(f"ocsp-responder: error: cannot sign, nothing written: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    except (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.InternalClientError,
    ) as exc:
        print(f"ocsp-responder: error: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    except (OSError, ConnectionError) as exc:
        print(f"ocsp-responder: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
