"""The spool: every document of every run, one JSON line each, in an append-only file per run.

TiledWriter runs as a callback; when it fails (server gone, disk full, a bug)
the run goes on and the catalog copy is incomplete. The spool is the copy that
does not depend on any server: it is written in the RunEngine's thread, one
``{"name": ..., "doc": ...}`` line per document, flushed per document and
fsync'ed at the stop document. ``import_spool`` loads it into any catalog.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nvmri_bluesky.errors import NvmriError

logger = logging.getLogger(__name__)

SPOOL_SUFFIX = ".jsonl"


def to_builtin(obj: Any) -> Any:
    """``json.dumps`` default: numpy arrays -> lists, numpy scalars -> Python numbers."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__array__"):
        return np.asarray(obj).tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps_document(name: str, doc: dict[str, Any]) -> str:
    """One spool line (without the newline). NaN and inf are kept (Python's JSON dialect)."""
    return json.dumps({"name": name, "doc": doc}, default=to_builtin, separators=(",", ":"))


class RunIndex:
    """Which run (start uid) a document belongs to, for any document type."""

    def __init__(self) -> None:
        self._by_descriptor: dict[str, str] = {}
        self._by_resource: dict[str, str] = {}
        self._by_stream_resource: dict[str, str] = {}

    def run_of(self, name: str, doc: dict[str, Any]) -> str | None:
        """Return the start uid of ``doc`` (None if it cannot be placed)."""
        if name == "start":
            return doc["uid"]
        if name in ("stop", "descriptor"):
            run = doc.get("run_start")
            if name == "descriptor" and run is not None:
                self._by_descriptor[doc["uid"]] = run
            return run
        if name in ("event", "event_page", "stream_datum"):
            return self._by_descriptor.get(doc.get("descriptor", ""))
        if name == "resource":
            run = doc.get("run_start")
            if run is not None:
                self._by_resource[doc["uid"]] = run
            return run
        if name == "stream_resource":
            run = doc.get("run_start")
            if run is not None:
                self._by_stream_resource[doc["uid"]] = run
            return run
        if name in ("datum", "datum_page"):
            return self._by_resource.get(doc.get("resource", ""))
        return None

    def forget(self, run_uid: str) -> None:
        """Drop the bookkeeping of a finished run."""
        for table in (self._by_descriptor, self._by_resource, self._by_stream_resource):
            for key in [k for k, v in table.items() if v == run_uid]:
                del table[key]


def spool_filename(start_doc: dict[str, Any]) -> str:
    """``YYYYmmddTHHMMSS_<uid>.jsonl`` from the start document (local time)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(start_doc.get("time", time.time())))
    return f"{stamp}_{start_doc['uid']}{SPOOL_SUFFIX}"


GAP_RECORD = "nvmri_spool_gap"
"""Name of a spool line that records documents the spool could not write (not a document)."""


class _Gap:
    """Documents of one run that could not be spooled (disk full, I/O error)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.events: dict[str, list[int]] = {}      # stream -> missing seq_nums
        self.other = 0                              # missing non-event documents

    def add(self, name: str, doc: dict[str, Any], stream: str) -> None:
        if name == "event":
            self.events.setdefault(stream, []).append(int(doc.get("seq_num", 0)))
        elif name == "event_page":
            self.events.setdefault(stream, []).extend(int(n) for n in doc.get("seq_num", []))
        else:
            self.other += 1

    def record(self, run: str) -> dict[str, Any]:
        return {"run_start": run, "reason": self.reason, "other_documents": self.other,
                "missing_events": {k: _ranges(v) for k, v in self.events.items()}}


def _ranges(numbers: list[int]) -> list[list[int]]:
    """Sorted numbers as [first, last] runs: [1, 2, 3, 7] -> [[1, 3], [7, 7]]."""
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def describe_gap(record: dict[str, Any]) -> str:
    """One line for a gap record: ``primary events 105-300 not spooled (reason)``."""
    parts = [f"{stream} events " + ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
             for stream, spans in record.get("missing_events", {}).items() if spans]
    if record.get("other_documents"):
        parts.append(f"{record['other_documents']} other document(s)")
    return f"{'; '.join(parts) or 'nothing'} not spooled ({record.get('reason', '?')})"


class _SpoolFile:
    """An append-only spool file written line by line; a failed write leaves no partial line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)        # drop the partial line
            except OSError:
                pass
            raise
        self.size += len(data)

    def close(self, sync: bool = True) -> None:
        try:
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


class SpoolWriter:
    """RunEngine callback: append every document, as one JSON line, to a file per run.

    Parameters
    ----------
    directory : str or Path
        Where the spool files go (created if missing).

    Notes
    -----
    Files are opened in append mode and never truncated; each line is written
    whole (a write that fails leaves no partial line) and the file is fsync'ed
    at the stop document, so a crash of the catalog (or of this process)
    loses at most the line being written, which ``read_spool`` tolerates.
    Failures here are logged, never raised, so the spool cannot abort a run
    either.  When the disk is full the first failure of a run is logged once;
    the documents that could not be written are recorded in a gap line
    (:data:`GAP_RECORD`) as soon as the spool can write again, and the
    spooled stop document's reason names them; the file is closed at the
    stop document whatever happens, so the next run spools afresh.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, _SpoolFile] = {}
        self.paths: dict[str, Path] = {}
        self._index = RunIndex()
        self._streams: dict[str, str] = {}          # descriptor uid -> stream name
        self._gaps: dict[str, _Gap] = {}            # run -> documents not written yet
        self._recorded: dict[str, list[str]] = {}   # run -> gaps written to its spool
        self.errors: list[str] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        run = None
        try:
            run = self._index.run_of(name, doc)
            if name == "descriptor":
                self._streams[doc["uid"]] = doc.get("name", "primary")
            self._write(run, name, doc)
        except Exception as err:  # a spool failure must not abort the run
            self._failed(run, name, doc, err)
        if name == "stop" and run is not None:
            self._finish(run)

    def _write(self, run: str | None, name: str, doc: dict[str, Any]) -> None:
        if run is None:
            raise NvmriError(f"{name} document does not belong to a known run")
        if name == "start":
            path = self.directory / spool_filename(doc)
            self.paths[run] = path
            self._files[run] = _SpoolFile(path)
        fh = self._files.get(run)
        if fh is None:
            raise NvmriError(f"{name} document of run {run[:8]} arrived after its stop")
        gap = self._gaps.get(run)
        if gap is not None:
            fh.write_line(json.dumps({"name": GAP_RECORD, "doc": gap.record(run)}))
            self._recorded.setdefault(run, []).append(describe_gap(gap.record(run)))
            del self._gaps[run]
        if name == "stop" and self._recorded.get(run):
            doc = {**doc, "reason": "; ".join(
                [doc["reason"]] * bool(doc.get("reason"))
                + [f"spool: {gap}" for gap in self._recorded[run]])}
        fh.write_line(dumps_document(name, doc))

    def _failed(self, run: str | None, name: str, doc: dict[str, Any], err: Exception) -> None:
        """Log the first failure of a run once; record what is missing."""
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        if run is None or run not in self._files:
            msg = f"spool: could not write a {name} document: {reason}"
            logger.error(msg)
            self.errors.append(msg)
            return
        gap = self._gaps.get(run)
        if gap is None:
            # a write into the file's last page can succeed on a full disk, so a run
            # may have several gaps: each is recorded, the failure logged at the first
            gap = self._gaps[run] = _Gap(reason)
            if run not in self._recorded:
                msg = (f"spool {self.paths[run]}: cannot write ({reason}); the run goes on, "
                       "and the documents not spooled are recorded once the spool can write "
                       "again")
                logger.error(msg)
                self.errors.append(msg)
        gap.add(name, doc, self._streams.get(doc.get("descriptor", ""), "?"))

    def _finish(self, run: str) -> None:
        """Close a run's file after its stop document, written or not (no leaked handle)."""
        fh = self._files.pop(run, None)
        gap = self._gaps.pop(run, None)
        self._recorded.pop(run, None)
        if gap is not None:
            msg = f"spool {self.paths.get(run)}: {describe_gap(gap.record(run))}; " \
                  "the stop document was not spooled"
            logger.error(msg)
            self.errors.append(msg)
        if fh is not None:
            try:
                fh.close(sync=gap is None)
            except OSError as err:
                self.errors.append(f"spool {fh.path}: closing failed: {err.strerror}")
        self._index.forget(run)

    def close(self) -> None:
        """Close files of runs that never stopped (their spool stays importable)."""
        for fh in self._files.values():
            try:
                fh.close()
            except OSError:
                pass
        self._files.clear()


def spool_gaps(path: str | Path) -> list[str]:
    """One line per gap record of a spool file (documents the spool could not write)."""
    gaps = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if GAP_RECORD in line:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("name") == GAP_RECORD:
                        gaps.append(describe_gap(record["doc"]))
    except OSError:
        return gaps
    return gaps


def read_spool(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(name, doc)`` from one spool file.

    A truncated or undecodable *last* line (a write cut short) is skipped with a
    warning; a bad line elsewhere is an ``NvmriError`` naming the line.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except OSError as err:
        raise NvmriError(f"cannot read spool file {path}: {err.strerror or err}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, doc = record["name"], record["doc"]
            if name == GAP_RECORD:            # not a document: see spool_gaps()
                continue
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                logger.warning("%s: last line is truncated; ignored", path)
                return
            raise NvmriError(f"spool file {path}: line {number} is not a document") from None
        yield name, doc


def spool_files(path: str | Path) -> list[Path]:
    """The spool files at ``path`` (a file, or a directory of ``*.jsonl``), sorted by name."""
    path = Path(path).expanduser()
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix == SPOOL_SUFFIX and p.is_file())
    if path.is_file():
        return [path]
    raise NvmriError(f"no spool file or directory at {path}")


def count_events(docs: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Events per stream name in a document list (event pages unpacked)."""
    stream_of: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name, doc in docs:
        if name == "descriptor":
            stream_of[doc["uid"]] = doc.get("name", "primary")
            counts.setdefault(stream_of[doc["uid"]], 0)
        elif name == "event":
            stream = stream_of.get(doc["descriptor"], "?")
            counts[stream] = counts.get(stream, 0) + 1
        elif name == "event_page":
            stream = stream_of.get(doc["descriptor"], "?")
            counts[stream] = counts.get(stream, 0) + len(doc.get("seq_num", []))
    return counts


def synthesize_stop(docs: list[tuple[str, dict[str, Any]]],
                    gaps: list[str] | None = None) -> dict[str, Any]:
    """A stop document for a spooled run whose process died before it stopped.

    ``gaps`` (:func:`spool_gaps`) names documents the spool could not write.
    """
    import uuid

    start = docs[0][1]
    last_time = max(
        (float(d.get("time", 0.0)) for _, d in docs if isinstance(d.get("time"), (int, float))),
        default=start.get("time", time.time()),
    )
    if not math.isfinite(last_time):
        last_time = start.get("time", time.time())
    return {
        "uid": str(uuid.uuid4()),
        "run_start": start["uid"],
        "time": last_time,
        "exit_status": "abort",
        "reason": "nvmri import: the spool ends without a stop document "
        "(the acquiring process died); every spooled event was kept"
        + "".join(f"; missing: {gap}" for gap in gaps or ()),
        "num_events": count_events(docs),
    }
