"""Compare a run in the catalog with its spool, event by event (``nvmri catalog verify``).

Counting events is not enough: a catalog can hold the right number of rows and
pair them with the wrong arrays (issue #12). :func:`verify_run` reads the run
the way replay and reconstruction do (:meth:`Catalog.documents`: the server's
``json-seq`` export, built from its table rows and arrays, or the same
rebuilt from the stored streams) and checks, for every event of the spool,
that the catalog has one event with its stream and ``seq_num`` whose time,
every scalar and every array (``counter_counts``) equal the spooled
document's, and that the catalog has no event the spool lacks. The start and
stop documents are compared too (uid, plan, exit status, event counts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvmri_bluesky.errors import NvmriError

from ._spool import read_spool, spool_files

#: Mismatch lines kept per run (the count is always complete).
MAX_REPORTED = 20


@dataclass
class VerifyResult:
    """What :func:`verify_run` found for one run.

    Attributes
    ----------
    uid : str
        The run's start uid.
    spool : str
        The spool file compared against.
    events : int
        Spooled events compared.
    mismatches : int
        Events (or documents) that differ, counted completely.
    details : list of str
        The first :data:`MAX_REPORTED` differences, one line each.
    """

    uid: str
    spool: str
    events: int = 0
    mismatches: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if every event and document matched."""
        return self.mismatches == 0

    def add(self, line: str) -> None:
        """Record one difference."""
        self.mismatches += 1
        if len(self.details) < MAX_REPORTED:
            self.details.append(line)

    def summary(self) -> str:
        """One line: uid, verdict, counts."""
        verdict = "ok" if self.ok else f"{self.mismatches} MISMATCH(ES)"
        return f"{self.uid[:8]}  {verdict}  {self.events} events  {Path(self.spool).name}"


_NUMBERS = (int, float)


def _values_equal(stored: Any, spooled: Any) -> bool:
    """Exact equality of a stored value and its spooled one (NaN equals NaN)."""
    if type(stored) in _NUMBERS and type(spooled) in _NUMBERS:
        # most of an event's values: what the array comparison below gives, without arrays
        if type(stored) is int and type(spooled) is int:
            return stored == spooled
        a, b = float(stored), float(spooled)
        return a == b or (a != a and b != b)
    a = np.asarray(stored)
    b = np.asarray(spooled)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        try:
            return bool(np.array_equal(a.astype(float), b.astype(float), equal_nan=True))
        except (TypeError, ValueError):
            return False
    if a.dtype.kind in "US" or b.dtype.kind in "USO":
        return a.astype(str).tolist() == b.astype(str).tolist()
    return bool(np.array_equal(a, b))


def _streams(docs: list[tuple[str, dict[str, Any]]], result: VerifyResult | None = None
             ) -> dict[str, dict[int, dict]]:
    """``{stream: {seq_num: event}}`` from a run's documents (event pages unpacked).

    With ``result``, an event whose stream and ``seq_num`` came before is
    recorded there as stored more than once.
    """
    from event_model import unpack_event_page

    names: dict[str, str] = {}
    streams: dict[str, dict[int, dict]] = {}
    for name, doc in docs:
        if name == "descriptor":
            names[doc["uid"]] = doc.get("name", "primary")
            streams.setdefault(names[doc["uid"]], {})
        elif name in ("event", "event_page"):
            events = [doc] if name == "event" else unpack_event_page(doc)
            for event in events:
                stream = names.get(event["descriptor"], "?")
                seq = int(event["seq_num"])
                if result is not None and seq in streams.get(stream, {}):
                    result.add(f"{stream} seq {seq}: stored more than once")
                streams.setdefault(stream, {})[seq] = event
    return streams


def _compare_documents(result: VerifyResult, stored: list[tuple[str, dict]],
                       docs: list[tuple[str, dict]]) -> None:
    start = next((doc for name, doc in stored if name == "start"), {})
    spooled_start = docs[0][1]
    for key in ("uid", "plan_name", "scan_id", "time"):
        if key in spooled_start and not _values_equal(start.get(key), spooled_start[key]):
            result.add(f"start.{key}: catalog {start.get(key)!r} != spool {spooled_start[key]!r}")
    spooled_stop = next((doc for name, doc in docs if name == "stop"), None)
    stop = next((doc for name, doc in stored if name == "stop"), None)
    if spooled_stop is None:
        return
    if not stop:
        result.add("stop: the spool has a stop document, the catalog none")
        return
    for key in ("uid", "exit_status", "num_events"):
        if stop.get(key) != spooled_stop.get(key):
            result.add(f"stop.{key}: catalog {stop.get(key)!r} != spool {spooled_stop.get(key)!r}")


def _compare_stream(result: VerifyResult, stream: str, stored: dict[int, dict],
                    events: dict[int, dict]) -> None:
    result.events += len(events)
    for seq in sorted(set(stored) - set(events)):
        result.add(f"{stream} seq {seq}: in the catalog, not in the spool")
    for seq, event in sorted(events.items()):
        row = stored.get(seq)
        if row is None:
            result.add(f"{stream} seq {seq}: in the spool, not in the catalog")
            continue
        data = row["data"]
        bad = [key for key, value in event["data"].items()
               if key not in data or not _values_equal(data[key], value)]
        if not math.isclose(float(row["time"]), float(event["time"]), rel_tol=0, abs_tol=1e-6):
            bad.append("time")
        if bad:
            shown = bad[0]
            stored_value = data.get(shown, row["time"])
            spooled = event["data"].get(shown, event["time"])
            result.add(f"{stream} seq {seq}: {', '.join(bad)} differ "
                       f"({shown}: catalog {stored_value!r} != spool {spooled!r})")


def verify_run(catalog: Any, spool_path: str | Path) -> VerifyResult:
    """Compare the run of one spool file with the catalog's copy, document by document.

    Parameters
    ----------
    catalog : Catalog
        An open catalog (:func:`open_catalog`).
    spool_path : str or Path
        The run's spool file.

    Returns
    -------
    VerifyResult
        ``ok`` only if every spooled event is in the catalog once, with equal
        time, scalars and arrays, nothing else is, and start/stop agree.
    """
    docs = list(read_spool(spool_path))
    if not docs or docs[0][0] != "start":
        raise NvmriError(f"spool file {spool_path} does not begin with a start document")
    result = VerifyResult(uid=docs[0][1]["uid"], spool=str(spool_path))
    try:
        stored = list(catalog.documents(result.uid))
    except NvmriError as err:
        result.add(str(err))
        return result
    _compare_documents(result, stored, docs)
    catalog_streams = _streams(stored, result)
    for stream, events in _streams(docs).items():
        _compare_stream(result, stream, catalog_streams.get(stream, {}), events)
    return result


def find_spool(uid: str, directories: Iterable[str | Path]) -> Path:
    """The spool file of run ``uid`` (or a unique uid prefix) in ``directories``."""
    matches = [path for directory in directories if Path(directory).is_dir()
               for path in spool_files(directory)
               if path.stem.partition("_")[2].startswith(uid)]
    if not matches:
        shown = ", ".join(str(d) for d in directories)
        raise NvmriError(f"no spool file for run {uid!r} in {shown} (give --spool DIR)")
    if len({p.stem.partition('_')[2] for p in matches}) > 1:
        raise NvmriError(f"run uid prefix {uid!r} matches several spool files; give more of it")
    return matches[0]


def verify_all(catalog: Any, directories: Iterable[str | Path]) -> list[VerifyResult]:
    """:func:`verify_run` for every spool file in ``directories`` (oldest first)."""
    results = []
    for directory in directories:
        if Path(directory).is_dir():
            results.extend(verify_run(catalog, path) for path in spool_files(directory))
    return results
