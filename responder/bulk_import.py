"""``ocsp-responder import``: back-fill certificates from files, resumably.

Inputs are PEM bundles, DER files (one or several concatenated certificates) and
directories, walked recursively for ``*.pem``, ``*.crt``, ``*.cer`` and ``*.der``.
Certificates go through the same ``CertificateRecorder`` as the admin API, in batches of
``batch_size`` per transaction, and the next batch is parsed and signed while the previous
one commits (pipelining: the CPU signs while PostgreSQL writes).

Resuming: every write is idempotent (``ON CONFLICT``), so running an import again is
always correct. To make it cheap too, a journal (``<data_dir>/import-journal.jsonl``)
records per file (path, size, mtime) how many certificates are durably done, appended
after each committed batch. A rerun skips files marked complete and, inside a file, the
certificates already committed; a file whose size or mtime changed starts over. A file
with a refused certificate is never marked complete, and its progress stops before the
first refused one: a rerun (after adding the missing issuer, say) tries it again instead of
skipping it as done.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import orjson
from cryptography import x509

from responder.progress import ProgressBar
from signer.recording import (
    CertificateRecorder,
    CertificateRejected,
    PreparedRecord,
    RecordOutcome,
    SerialCollisionRejected,
    describe_certificate_serial,
    describe_issuer,
    format_serial,
    parse_certificate,
    split_certificates,
)

log = logging.getLogger(__name__)

CERTIFICATE_SUFFIXES = {".pem", ".crt", ".cer", ".der"}


class ImportInputError(Exception):
    """An import input cannot be used (e.g. a path that does not exist)."""


def discover(paths: list[Path]) -> list[Path]:
    """Named files as given; directories walked recursively for certificate suffixes."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in CERTIFICATE_SUFFIXES:
                        found.append(Path(root) / name)
        elif path.exists():
            found.append(path)
        else:
            raise ImportInputError(f"{path}: no such file or directory")
    return found


@dataclass(frozen=True, slots=True)
class FileKey:
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        st = path.stat()
        return cls(str(path.resolve()), st.st_size, st.st_mtime_ns)


class ImportJournal:
    """Append-only record of how far each input file got (see module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.progress: dict[FileKey, tuple[int, bool]] = {}
        earlier = path.read_bytes() if path.exists() else b""
        if earlier:
            for line in earlier.splitlines():
                try:
                    entry = orjson.loads(line)
                    key = FileKey(entry["path"], entry["size"], entry["mtime_ns"])
                    self.progress[key] = (int(entry["done"]), bool(entry["complete"]))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn last line from an interrupted run
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(path, "ab")  # noqa: SIM115 - kept open for the whole import
        if earlier and not earlier.endswith(b"\n"):
            # a torn last line: end it, or the next entry would be glued to it and lost
            self._out.write(b"\n")

    def done(self, key: FileKey) -> tuple[int, bool]:
        return self.progress.get(key, (0, False))

    def mark(self, key: FileKey, done: int, complete: bool) -> None:
        """Record progress durably: written after the batch's commit, never before."""
        self.progress[key] = (done, complete)
        self._out.write(
            orjson.dumps(
                {
                    "path": key.path,
                    "size": key.size,
                    "mtime_ns": key.mtime_ns,
                    "done": done,
                    "complete": complete,
                }
            )
            + b"\n"
        )
        self._out.flush()
        os.fsync(self._out.fileno())

    def close(self) -> None:
        self._out.close()


@dataclass
class ImportReport:
    files: int = 0
    created: int = 0
    existing: int = 0
    refused: int = 0
    unreadable: int = 0
    resumed_past: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.refused or self.unreadable)


@dataclass
class _Batch:
    certs: list[x509.Certificate]
    marks: list[tuple[FileKey, int, bool]]  # journal entries to write once committed
    consumed: int = 0  # input certificates this batch accounts for (refused ones too)
    #: (file, index in the file) of each of ``certs``
    origins: list[tuple[FileKey, int]] = field(default_factory=list)


class Importer:
    """Feeds files through the recorder in pipelined batches, journaling progress."""

    def __init__(
        self,
        recorder: CertificateRecorder,
        journal: ImportJournal | None,
        *,
        batch_size: int = 1000,
        errors: TextIO | None = None,
    ) -> None:
        self.recorder = recorder
        self.journal = journal
        self.batch_size = batch_size
        self.errors = errors
        self.report = ImportReport()
        #: per file, the index of its first refused certificate in this run: the journal
        #: never records progress past it (see the module docstring)
        self._first_refused: dict[FileKey, int] = {}

    def _refused(self, key: FileKey, index: int) -> None:
        self.report.refused += 1
        self._first_refused[key] = min(index, self._first_refused.get(key, index))

    def _problem(self, text: str) -> None:
        self.report.problems.append(text)
        if self.errors is not None:
            self.errors.write(text + "\n")

    def _plan(self, files: list[Path]) -> list[tuple[Path, FileKey, list[bytes], int]]:
        plan = []
        for path in files:
            self.report.files += 1
            try:
                key = FileKey.of(path)
                blobs = split_certificates(path.read_bytes())
            except OSError as exc:
                self.report.unreadable += 1
                self._problem(f"{path}: cannot read: {exc.strerror}")
                continue
            except CertificateRejected as exc:
                self.report.refused += 1
                self._problem(f"{path}: refused: {exc}")
                continue
            if not blobs:
                self.report.refused += 1
                self._problem(f"{path}: refused: no certificate found")
                continue
            done, complete = self.journal.done(key) if self.journal else (0, False)
            if complete and done == len(blobs):
                self.report.resumed_past += done
                continue
            done = min(done, len(blobs))
            self.report.resumed_past += done
            plan.append((path, key, blobs, done))
        return plan

    def _batches(self, plan: list[tuple[Path, FileKey, list[bytes], int]]) -> Iterator[_Batch]:
        """Parsed certificates in batches; unparsable ones are reported as they appear."""
        batch = _Batch([], [])
        for path, key, blobs, start in plan:
            for index in range(start, len(blobs)):
                batch.consumed += 1
                try:
                    batch.certs.append(parse_certificate(blobs[index]))
                    batch.origins.append((key, index))
                except CertificateRejected as exc:
                    self._refused(key, index)
                    self._problem(f"{path}: certificate #{index + 1}: refused: {exc}")
                last = index + 1 == len(blobs)
                full = len(batch.certs) >= self.batch_size
                if last or full:
                    batch.marks.append((key, index + 1, last))
                if full:
                    yield batch
                    batch = _Batch([], [])
        if batch.consumed:
            yield batch

    async def run(self, files: list[Path], progress: ProgressBar | None = None) -> ImportReport:
        """Import everything; raises StoreUnavailable (journal intact) if the database fails."""
        plan = self._plan(files)
        if progress is not None:
            progress.total = sum(len(blobs) - start for _, _, blobs, start in plan)
        in_flight: asyncio.Task[list[RecordOutcome]] | None = None
        in_flight_batch: _Batch | None = None
        try:
            for batch in self._batches(plan):
                # sign this batch while the previous one commits
                prepared, rejected = await self.recorder.prepare_all(batch.certs)
                for index, exc in rejected:
                    key, position = batch.origins[index]
                    self._refused(key, position)
                    cert = batch.certs[index]
                    self._problem(
                        f"{key.path}: certificate #{position + 1} (serial "
                        f"{describe_certificate_serial(cert)}, issuer {describe_issuer(cert)}): "
                        f"refused: {exc}"
                    )
                refused = {index for index, _ in rejected}
                origins = [o for i, o in enumerate(batch.origins) if i not in refused]
                if in_flight is not None and in_flight_batch is not None:
                    self._finish(await in_flight, in_flight_batch, progress)
                in_flight = asyncio.create_task(self._commit(prepared, origins))
                in_flight_batch = batch
            if in_flight is not None and in_flight_batch is not None:
                self._finish(await in_flight, in_flight_batch, progress)
                in_flight = None
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
        return self.report

    async def _commit(
        self, prepared: list[PreparedRecord], origins: list[tuple[FileKey, int]]
    ) -> list[RecordOutcome]:
        """Commit a batch; a certificate whose serial another certificate holds (a
        serial collision: the whole transaction was refused) is reported as refused and
        the rest of the batch is committed again without it, like a certificate refused
        when it was prepared (and, like it, never journaled as done). Each round drops at
        least one, so this ends. ``origins``: (file, index in it) of each prepared one."""
        while True:
            try:
                return await self.recorder.commit(prepared)
            except SerialCollisionRejected as exc:
                for index, why in exc.collisions:
                    key, position = origins[index]
                    self._refused(key, position)
                    p = prepared[index]
                    self._problem(
                        f"{key.path}: certificate #{position + 1} (serial "
                        f"{format_serial(p.record.serial)}, issuer {p.issuer}): refused: {why}"
                    )
                dropped = {index for index, _ in exc.collisions}
                prepared = [p for i, p in enumerate(prepared) if i not in dropped]
                origins = [o for i, o in enumerate(origins) if i not in dropped]

    def _finish(
        self, outcomes: list[RecordOutcome], batch: _Batch, progress: ProgressBar | None
    ) -> None:
        created = sum(o.created for o in outcomes)
        self.report.created += created
        self.report.existing += len(outcomes) - created
        if self.journal is not None:
            for key, done, complete in batch.marks:
                refused_at = self._first_refused.get(key)
                if refused_at is not None:  # retried by the next run, never skipped
                    done, complete = min(done, refused_at), False
                self.journal.mark(key, done, complete)
        if progress is not None:
            progress.advance(batch.consumed)
