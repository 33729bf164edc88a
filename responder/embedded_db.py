"""An embedded PostgreSQL (pgserver) for when no ``database_url`` is configured.

For trying the responder and for the demo; production points ``database_url`` at a real,
backed-up cluster. The cluster lives under ``data_dir/postgres`` and is stopped when the
process that started it exits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedDatabaseError(Exception):
    """The embedded PostgreSQL could not be started."""


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) the cluster under ``data_dir/postgres``; returns its DSN."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset on servers
            import pgserver
    except ImportError as exc:  # pragma: no cover - pgserver is a declared dependency
        raise EmbeddedDatabaseError("pgserver is not installed: pip install pgserver") from exc
    pgdata = data_dir.resolve() / "postgres"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    except Exception as exc:
        raise EmbeddedDatabaseError(
            f"embedded PostgreSQL failed to start in {pgdata}: {exc}"
        ) from exc
    uri: str = server.get_uri()
    log.info("embedded PostgreSQL running in %s", pgdata)
    return uri
