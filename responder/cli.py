"""The ``ocsp-responder`` command line.

Errors the operator can fix (configuration, a bad file, a refused certificate) print one
clear line to stderr and exit non-zero; no tracebacks for expected failures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from responder.config import Config, ConfigError, load_config
from responder.embedded_db import EmbeddedDatabaseError
from responder.schema import SchemaError, migrate
from responder.store import StoreUnavailable

log = logging.getLogger("ocsp_responder")


class CommandError(Exception):
    """A failure to report to the operator as one line, exit status 1."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else None)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pgserver").setLevel(logging.WARNING)


async def _with_service(config: Config):  # type: ignore[no-untyped-def]
    from responder.service import ResponderService

    service = ResponderService(config)
    await service.start(pool_size=4)
    return service


def cmd_serve(args: argparse.Namespace) -> None:
    from responder.server import serve

    config = _config(args)
    _setup_logging(config.log_level)
    asyncio.run(serve(config))


def cmd_migrate(args: argparse.Namespace) -> None:
    from responder.service import resolve_database_url

    config = _config(args)
    _setup_logging(config.log_level)
    dsn = args.database_url or resolve_database_url(config)
    applied = asyncio.run(migrate(dsn, target=args.target))
    if applied:
        print(f"applied migrations: {', '.join(f'{v:04d}' for v in applied)}")
    else:
        print("schema is up to date")


def cmd_issue(args: argparse.Namespace) -> None:
    from signer.recording import CertificateRejected, format_serial, load_certificates

    config = _config(args)
    _setup_logging(config.log_level)

    async def run() -> int:
        service = await _with_service(config)
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
                except StoreUnavailable as exc:
                    print(f"{name}: NOT recorded (do not publish): {exc}", file=sys.stderr)
                    for rest in args.files[position + 1 :]:
                        print(f"{rest}: NOT recorded (not attempted)", file=sys.stderr)
                    return 3
                for o in outcomes:
                    kind = "precertificate" if o.precertificate else "certificate"
                    state = "recorded" if o.created else "already recorded"
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
    _setup_logging(config.log_level)
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
        except StoreUnavailable as exc:
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


def cmd_revoke(args: argparse.Namespace) -> None:
    from signer.recording import format_serial, parse_serial
    from signer.response_builder import parse_reason

    config = _config(args)
    _setup_logging(config.log_level)
    try:
        serial = parse_serial(args.serial)
        reason = parse_reason(args.reason)
        when = dt.datetime.fromisoformat(args.time) if args.time else None
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if when is not None and when.tzinfo is None:
        raise CommandError("--time needs a time zone, e.g. 2026-01-02T03:04:05Z")

    async def run() -> None:
        service = await _with_service(config)
        try:
            issuer = service.registry.by_name(args.issuer)
            if issuer is None:
                names = ", ".join(i.name for i in service.registry.issuers)
                raise CommandError(f"unknown issuer {args.issuer!r}; configured: {names}")
            outcome = await service.revoker.revoke(issuer, serial, reason, when)
        finally:
            await service.close()
        state = "revoked" if outcome.created else "was already revoked"
        print(
            f"{format_serial(serial)} ({args.issuer}): {state} at "
            f"{outcome.revocation.revoked_at.isoformat()} ({outcome.revocation.reason.name})"
        )

    asyncio.run(run())


def cmd_demo(args: argparse.Namespace) -> None:
    from responder.demo import run_demo

    _setup_logging("info")
    asyncio.run(
        run_demo(Path(args.data_dir), args.listen, args.admin_listen, serve=not args.no_serve)
    )


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
    p = sub.add_parser("demo", help="demo CA + embedded PostgreSQL + responder, ready for openssl")
    p.add_argument("--data-dir", default="var/demo", help="where the demo keeps its files")
    p.add_argument("--listen", default="127.0.0.1:8080")
    p.add_argument("--admin-listen", default="127.0.0.1:8081")
    p.add_argument("--no-serve", action="store_true", help="set up and exit without serving")
    p.set_defaults(func=cmd_demo)
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
