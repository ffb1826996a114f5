"""The catalog: reading runs, run tables, and writing through a RunEngine subscription."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvmri_bluesky.errors import NvmriError

from ._common import default_spool_dir, is_uri, one_line
from ._spool import SpoolWriter
from ._writer import DEFAULT_BATCH_SIZE, DEFAULT_STOP_TIMEOUT, CatalogWriter

logger = logging.getLogger(__name__)

#: The shortest uid prefix ``CatalogOfBlueskyRuns`` looks up.
MIN_PREFIX = 5


@dataclass(frozen=True)
class RunRow:
    """One line of ``Catalog.runs()``."""

    uid: str
    time: float
    plan: str
    scenario: str
    points: int | None
    status: str


class Catalog:
    """A tiled catalog of bluesky runs (embedded or facility), usable as a context manager.

    Use :func:`open_catalog` to make one.

    Attributes
    ----------
    client : tiled client
        The root container (``CatalogOfBlueskyRuns`` where the server declares it).
    location : str
        The directory (embedded) or the URI without key (facility).
    server : EmbeddedServer or None
        The embedded server, closed with the catalog.
    """

    def __init__(
        self,
        client: Any,
        location: str,
        server: Any = None,
        make_client: Callable[[], Any] | None = None,
    ) -> None:
        self.client = client
        self.location = location
        self.server = server
        self._make_client = make_client or (lambda: client)
        self._writers: list[CatalogWriter] = []
        self._spools: list[SpoolWriter] = []
        self._subscriptions: list[tuple[Any, list[int]]] = []
        self._remembered: dict[str, list[tuple[str, dict[str, Any]]]] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Unsubscribe from RunEngines, flush writers, close the spool and the server."""
        for RE, tokens in self._subscriptions:
            for token in tokens:
                try:
                    RE.unsubscribe(token)
                except Exception:  # best effort on shutdown
                    pass
        self._subscriptions.clear()
        for writer in self._writers:
            writer.close()
        for spool in self._spools:
            spool.close()
        if self.server is not None:
            self.server.close()
            self.server = None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.server is not None:
            kind = "embedded"
        else:
            kind = "remote" if is_uri(self.location) else "embedded, served by another process"
        return f"<Catalog {kind} {self.location}>"

    # -- writing -------------------------------------------------------------------------

    def default_spool_dir(self) -> Path:
        """See :func:`default_spool_dir` (``$NVMRI_SPOOL``, ``<dir>/spool``, per-user)."""
        return default_spool_dir(self.location)

    def subscribe(
        self,
        RE: Any,
        spool_dir: str | Path | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        ordered: bool = True,
    ) -> list[int]:
        """Subscribe the spool writer and the catalog writer to a RunEngine.

        Parameters
        ----------
        RE : bluesky.RunEngine
        spool_dir : str or Path, optional
            Directory of the per-run JSON-lines spool; see :meth:`default_spool_dir`.
        batch_size : int
            Events per catalog write (TiledWriter batching).
        stop_timeout : float
            Longest wait, at a stop document, for the catalog to be written.
        ordered : bool
            Event tables ordered by ``seq_num`` (default; see :func:`make_tiled_writer`).

        Returns
        -------
        list of int
            The RunEngine subscription tokens (spool first, then catalog).

        Notes
        -----
        Also makes the RunEngine number its runs from the catalog
        (``RE.scan_id_source = catalog.next_scan_id``), so scan_id does not
        start again at 1 in every session or process.
        """
        spool = SpoolWriter(spool_dir if spool_dir is not None else self.default_spool_dir())
        writer = CatalogWriter(
            self._make_client, batch_size=batch_size, stop_timeout=stop_timeout, ordered=ordered
        )
        tokens = [RE.subscribe(spool), RE.subscribe(writer)]
        RE.scan_id_source = self.next_scan_id
        self._spools.append(spool)
        self._writers.append(writer)
        self._subscriptions.append((RE, tokens))
        return tokens

    def max_scan_id(self) -> int:
        """The largest ``start.scan_id`` in the catalog (0 if none)."""
        try:
            newest = self.client.sort(("start.scan_id", -1))
            for _, node in newest.items().head(1):
                scan_id = (node.metadata.get("start") or {}).get("scan_id")
                return int(scan_id) if isinstance(scan_id, (int, float)) else 0
        except Exception as err:  # a broken catalog must not stop a run from opening
            logger.warning("cannot read scan_ids from %s: %s", self.location, one_line(err))
        return 0

    def next_scan_id(self, md: dict[str, Any]) -> int:
        """A RunEngine ``scan_id_source``: one more than any scan_id used so far.

        The largest of the catalog's scan_ids, this RunEngine's last one and,
        for a catalog directory, the directory's counter (``<dir>/scan_id``,
        updated under a file lock, so processes sharing the directory never
        draw the same number). Facility catalogs have no counter: two
        processes opening runs at the same instant may draw the same number.
        """
        base = max(self.max_scan_id(), int(md.get("scan_id") or 0))
        if is_uri(self.location):
            return base + 1
        from ._shared import next_counter

        return next_counter(Path(self.location), "scan_id", base)

    @property
    def writer_errors(self) -> list[str]:
        """One line per catalog or spool write failure since subscription."""
        errors: list[str] = []
        for spool in self._spools:
            errors.extend(spool.errors)
        for writer in self._writers:
            errors.extend(writer.errors)
        return errors

    def flush(self, timeout: float | None = DEFAULT_STOP_TIMEOUT) -> bool:
        """Wait until subscribed catalog writers have written every document received."""
        return all(writer.flush(timeout) for writer in self._writers)

    def spool_path(self, uid: str) -> Path | None:
        """The spool file of a run written through :meth:`subscribe` (None if unknown)."""
        for spool in self._spools:
            for run, path in spool.paths.items():
                if run.startswith(uid):
                    return path
        return None

    # -- reading -------------------------------------------------------------------------

    def runs(self, limit: int | None = None) -> list[RunRow]:
        """The runs, newest first (by start time).

        Parameters
        ----------
        limit : int, optional
            Return at most this many.
        """
        rows: list[RunRow] = []
        try:
            for key, node in self.client.sort(("start.time", -1)).items():
                if limit is not None and len(rows) >= limit:
                    break
                md = node.metadata
                start = md.get("start")
                if not isinstance(start, dict):
                    continue
                stop = md.get("stop") or {}
                num_events = stop.get("num_events") or {}
                points = num_events.get("primary") if stop else None
                status = stop.get("exit_status", "?") if stop else "incomplete"
                rows.append(
                    RunRow(
                        uid=str(start.get("uid", key)),
                        time=float(start.get("time", 0.0)),
                        plan=str(start.get("plan_name", "")),
                        scenario=str(start.get("scenario", "")),
                        points=None if points is None else int(points),
                        status=str(status),
                    )
                )
        except NvmriError:
            raise
        except Exception as err:  # one line for the user
            raise NvmriError(f"cannot list runs in {self.location}: {one_line(err)}") from None
        return rows

    def run(self, uid: str) -> Any:
        """The ``BlueskyRun`` client of a run, by uid or unique uid prefix (5 characters or more).

        The lookup is ``CatalogOfBlueskyRuns.__getitem__`` (a full uid, else a
        ``start.uid`` prefix search).

        Raises
        ------
        NvmriError
            No run, or more than one, matches.
        """
        uid = str(uid).strip()
        if not re.fullmatch(r"[0-9A-Za-z-]+", uid):
            raise NvmriError(f"no run {uid!r} in catalog {self.location}")
        try:
            return self.client[uid]
        except KeyError:
            raise NvmriError(f"no run {uid!r} in catalog {self.location}") from None
        except ValueError:  # bluesky_tiled_plugins: prefix too short, or several matches
            if len(uid) < MIN_PREFIX:
                raise NvmriError(f"run uid prefix {uid!r} is too short: give at least "
                                 f"{MIN_PREFIX} characters") from None
            raise NvmriError(f"run uid prefix {uid!r} is ambiguous; give more of it") from None
        except Exception as err:
            raise NvmriError(f"cannot read catalog {self.location}: {one_line(err)}") from None

    def documents(self, uid: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The run's documents, for replay: start, descriptors, events (time order), stop.

        Uses the server's BlueskyRun ``application/json-seq`` exporter (the
        embedded server and ``profile_collection/tiled/config.yml`` register it)
        and falls back to rebuilding the documents from the stored data.
        Event uids are synthetic; data, timestamps and metadata round-trip.
        """
        docs = None if self._remembered is None else self._remembered.get(uid)
        if docs is None:
            run = self.run(uid)
            try:
                docs = [(name, dict(doc)) for name, doc in run.documents()]
            except Exception as err:  # older server without the exporter
                logger.info("json-seq export unavailable (%s); rebuilding documents",
                            one_line(err))
                docs = list(_documents_from_nodes(run))
            if self._remembered is not None and any(name == "stop" and doc
                                                    for name, doc in docs):
                self._remembered[uid] = docs
        for name, doc in docs:
            if name == "stop" and not doc:
                continue  # the run never stopped
            yield name, doc

    @contextlib.contextmanager
    def remembering_documents(self) -> Iterator[None]:
        """Within this block, a stopped run's documents are read from the server once.

        For a reader that verifies runs and then reconstructs them
        (``nvmri demo``): :meth:`documents` keeps what it read, keyed by the
        uid as given, until the block ends; a run rewritten meanwhile
        (:func:`repair_from_spool`) is read again.
        """
        self._remembered = {}
        try:
            yield
        finally:
            self._remembered = None

    def forget(self, uid: str) -> None:
        """Drop a run remembered by :meth:`remembering_documents` (it was rewritten)."""
        if self._remembered is not None:
            self._remembered = {k: v for k, v in self._remembered.items()
                                if not uid.startswith(k) and not k.startswith(uid)}

    def table(self, uid: str, stream: str = "primary") -> Any:
        """Shortcut for ``run_table(self.run(uid), stream)``."""
        return run_table(self.run(uid), stream)


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _documents_from_nodes(run: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rebuild documents from a run's stored streams (no server exporter needed)."""
    start = dict(run.metadata["start"])
    yield "start", start
    events: list[dict[str, Any]] = []
    for stream_name in list(run):
        node = run[stream_name]
        descriptors = [dict(d) for d in getattr(node, "descriptors", [])]
        if not descriptors:
            continue
        for desc in descriptors:
            yield "descriptor", desc
        ds = run_table(run, stream_name, rename=False)
        if not ds.sizes.get("time"):
            continue
        times = ds["time"].values
        seq = ds["seq_num"].values if "seq_num" in ds.coords else np.arange(1, len(times) + 1)
        names = list(ds.data_vars)
        for i, t in enumerate(times):
            data = {k: _to_builtin(ds[k].values[i]) for k in names}
            events.append(
                {
                    "uid": f"event-{descriptors[0]['uid']}-{int(seq[i])}",
                    "descriptor": descriptors[0]["uid"],
                    "seq_num": int(seq[i]),
                    "time": float(t),
                    "data": data,
                    "timestamps": {k: float(t) for k in names},
                }
            )
    events.sort(key=lambda e: e["time"])
    for event in events:
        yield "event", event
    stop = run.metadata.get("stop")
    if stop:
        yield "stop", dict(stop)


# --------------------------------------------------------------------------------------
# Reading a stream as a table.


def run_table(run: Any, stream: str = "primary", *, rename: bool = True) -> Any:
    """One stream of a run as an ``xarray.Dataset``, one row per event.

    Parameters
    ----------
    run : BlueskyRun
        From :meth:`Catalog.run`.
    stream : str
        The event stream (``primary`` by default).
    rename : bool
        Name the gate axis of ``counter_counts`` ``gate`` (default True).

    Returns
    -------
    xarray.Dataset
        Dimension ``time`` (event time, s since epoch, in ``seq_num`` order) with
        coordinate ``seq_num``; one variable per data key (scalars are 1D;
        ``counter_counts`` is ``(time, gate)``, with gate names as coordinate when
        its data key lists them as ``"gates"``). Each variable's attrs carry the
        descriptor's data-key entry (``units``, ``source``, ``dtype``, ``shape``);
        the dataset's attrs carry ``uid``, ``plan_name``, ``scenario`` and
        ``stream``. A stream with no events gives an empty dataset.
    """
    import xarray as xr

    start = run.metadata.get("start", {})
    uid = str(start.get("uid", ""))
    streams = list(run)
    if stream not in streams:
        raise NvmriError(
            f"run {uid[:8]} has no stream {stream!r} (streams: {', '.join(streams) or 'none'})"
        )
    node = run[stream]
    data_keys = dict(node.metadata.get("data_keys", {}))
    keys = list(node)
    has_table = bool(keys)
    if not has_table:
        ds = xr.Dataset(coords={"time": np.array([], dtype=float)})
    else:
        try:
            from bluesky_tiled_plugins.clients.bluesky_event_stream import DATAVALUES

            variables = (DATAVALUES, "seq_num") if "seq_num" in keys else (DATAVALUES,)
            ds = node.read(variables=variables)
        except Exception as err:
            raise NvmriError(
                f"cannot read stream {stream!r} of run {uid[:8]}: {one_line(err)}"
            ) from None
        if "seq_num" in ds.data_vars:
            ds = ds.set_coords("seq_num")
            order = np.argsort(ds["seq_num"].values, kind="stable")
            if not np.array_equal(order, np.arange(order.size)):
                ds = ds.isel(time=order)
    for name in ds.data_vars:
        entry = data_keys.get(name)
        if isinstance(entry, dict):
            ds[name].attrs.update(
                {k: v for k, v in entry.items() if isinstance(v, (str, int, float, list))}
            )
    if rename and "counter_counts" in ds.data_vars:
        extra = [d for d in ds["counter_counts"].dims if d != "time"]
        if len(extra) == 1 and "gate" not in ds.dims:
            shared = [v for v in ds.data_vars if v != "counter_counts" and extra[0] in ds[v].dims]
            if not shared:
                ds = ds.rename({extra[0]: "gate"})
        names = data_keys.get("counter_counts", {}).get("gates")
        if "gate" in ds.dims and isinstance(names, list) and len(names) == ds.sizes["gate"]:
            ds = ds.assign_coords(gate=[str(n) for n in names])
    ds.attrs.update(
        {
            "uid": uid,
            "plan_name": str(start.get("plan_name", "")),
            "scenario": str(start.get("scenario", "")),
            "stream": stream,
        }
    )
    return ds

