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
from typing import IO, Any

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


class SpoolWriter:
    """RunEngine callback: append every document, as one JSON line, to a file per run.

    Parameters
    ----------
    directory : str or Path
        Where the spool files go (created if missing).

    Notes
    -----
    Files are opened in append mode and never truncated; each line is flushed
    when written and the file is fsync'ed at the stop document, so a crash of
    the catalog (or of this process) loses at most the line being written,
    which ``read_spool`` tolerates. Failures here are logged, never raised, so
    the spool cannot abort a run either.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[str]] = {}
        self.paths: dict[str, Path] = {}
        self._index = RunIndex()
        self.errors: list[str] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self._write(name, doc)
        except Exception as err:  # a spool failure must not abort the run
            msg = f"spool: could not write a {name} document: {err}"
            logger.error(msg)
            self.errors.append(msg)

    def _write(self, name: str, doc: dict[str, Any]) -> None:
        run = self._index.run_of(name, doc)
        if run is None:
            raise NvmriError(f"{name} document does not belong to a known run")
        if name == "start":
            path = self.directory / spool_filename(doc)
            self.paths[run] = path
            self._files[run] = open(path, "a", encoding="utf-8")
        fh = self._files.get(run)
        if fh is None:
            raise NvmriError(f"{name} document of run {run[:8]} arrived after its stop")
        fh.write(dumps_document(name, doc) + "\n")
        fh.flush()
        if name == "stop":
            os.fsync(fh.fileno())
            fh.close()
            del self._files[run]
            self._index.forget(run)

    def close(self) -> None:
        """Close files of runs that never stopped (their spool stays importable)."""
        for fh in self._files.values():
            try:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            except OSError:
                pass
        self._files.clear()


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


def synthesize_stop(docs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """A stop document for a spooled run whose process died before it stopped."""
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
        "(the acquiring process died); every spooled event was kept",
        "num_events": count_events(docs),
    }
