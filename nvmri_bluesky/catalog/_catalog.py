"""The run catalog: an embedded tiled server by default, a facility tiled server by URI."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import numpy as np

from nvmri_bluesky.errors import NvmriError

from ._spool import (
    RunIndex,
    SpoolWriter,
    count_events,
    read_spool,
    spool_files,
    spool_gaps,
    synthesize_stop,
)
from ._writer import make_ordered_tiled_writer

logger = logging.getLogger(__name__)

#: Events cached by TiledWriter before it writes them to the catalog in one request.
DEFAULT_BATCH_SIZE = 500
#: Seconds the RunEngine waits, at a stop document, for the catalog writer to catch up.
DEFAULT_STOP_TIMEOUT = 60.0
#: Seconds to wait for a facility server to answer before calling it unreachable.
CONNECT_TIMEOUT = 5.0
#: Environment variables read by every part of the package (the profile, the CLI, the
#: demo): the catalog (directory or URI), its API key, the spool directory.
ENV_CATALOG = "NVMRI_CATALOG"
ENV_API_KEY = "NVMRI_API_KEY"
ENV_SPOOL = "NVMRI_SPOOL"
#: Default embedded catalog directory (per user).
DEFAULT_CATALOG_DIR = "~/.local/share/nvmri/catalog"
#: Default spool directory for a facility (URI) catalog (per user).
DEFAULT_SPOOL_DIR = "~/.local/share/nvmri/spool"


def default_location(env: dict[str, str] | None = None) -> str:
    """``$NVMRI_CATALOG`` if set, else ``~/.local/share/nvmri/catalog`` (embedded)."""
    env = os.environ if env is None else env
    return env.get(ENV_CATALOG) or str(Path(DEFAULT_CATALOG_DIR).expanduser())


def default_api_key(env: dict[str, str] | None = None) -> str | None:
    """``$NVMRI_API_KEY`` if set (tiled's own client also reads ``$TILED_API_KEY``)."""
    env = os.environ if env is None else env
    return env.get(ENV_API_KEY) or None


def default_spool_dir(location: str, env: dict[str, str] | None = None) -> Path:
    """``$NVMRI_SPOOL``; else ``<catalog dir>/spool`` (embedded) or the per-user spool."""
    env = os.environ if env is None else env
    if env.get(ENV_SPOOL):
        return Path(env[ENV_SPOOL]).expanduser()
    if is_uri(location):
        return Path(DEFAULT_SPOOL_DIR).expanduser()
    return Path(location).expanduser() / "spool"


def is_uri(location: str | os.PathLike[str] | None) -> bool:
    """True for an ``http://`` or ``https://`` catalog location."""
    return isinstance(location, str) and location.lower().startswith(("http://", "https://"))


def _split_key(uri: str) -> tuple[str, str | None]:
    """Remove an ``api_key`` query parameter from a URI; return (uri, key)."""
    parts = urlparse(uri)
    query = parse_qs(parts.query)
    keys = query.pop("api_key", None)
    clean = urlunparse(parts._replace(query=urlencode(query, doseq=True)))
    return clean, (keys[0] if keys else None)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def make_tiled_writer(
    client: Any, batch_size: int = DEFAULT_BATCH_SIZE, *, ordered: bool = True
) -> Any:
    """The TiledWriter this package uses.

    ``bluesky_tiled_plugins.TiledWriter`` (the maintained one; the copy in
    ``bluesky.callbacks.tiled_writer`` is older), with ``max_array_size=0`` so
    every array data key of an event (e.g. ``counter_counts``) is stored as a
    zarr array (files) and every scalar as a table column, and with the event
    tables ordered by ``seq_num`` (:mod:`nvmri_bluesky.catalog._writer`: without
    it a PostgreSQL server may pair table rows with other events' arrays).

    Parameters
    ----------
    client : tiled client
        The catalog root.
    batch_size : int
        Events per write.
    ordered : bool
        False gives the stock TiledWriter (only for the test that shows the bug).
    """
    if ordered:
        return make_ordered_tiled_writer(client, batch_size=batch_size, max_array_size=0)
    from bluesky_tiled_plugins import TiledWriter

    return TiledWriter(client, batch_size=batch_size, max_array_size=0)


# --------------------------------------------------------------------------------------
# The catalog writer: TiledWriter on a worker thread, its failures never reach the RE.


class CatalogWriter:
    """A RunEngine callback that feeds TiledWriter on a worker thread.

    Documents are queued and written in order on one thread, so the RunEngine
    never waits on the catalog except at a stop document, where it waits (at
    most ``stop_timeout`` s) until the run is written, so that after ``RE(...)``
    returns the run is in the catalog. A TiledWriter failure is logged and
    recorded in ``errors``; the rest of that run is not sent to the catalog
    (a partial run never gets a stop document there, so it cannot pass for a
    complete one) and the spool, written independently, keeps the documents.

    Parameters
    ----------
    make_client : callable
        Returns a fresh tiled client (the worker owns its own HTTP client).
    batch_size : int
        Events TiledWriter caches before each write.
    stop_timeout : float
        Longest wait at a stop document, in seconds.
    ordered : bool
        See :func:`make_tiled_writer` (False only to reproduce issue #12).
    """

    def __init__(
        self,
        make_client: Callable[[], Any],
        batch_size: int = DEFAULT_BATCH_SIZE,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        ordered: bool = True,
    ) -> None:
        self._make_client = make_client
        self.batch_size = batch_size
        self.ordered = ordered
        self.stop_timeout = stop_timeout
        self.errors: list[str] = []
        self.failed_runs: set[str] = set()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._index = RunIndex()
        self._active: set[str] = set()
        self._writer: Any = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="nvmri-catalog-writer", daemon=True)
        self._thread.start()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if self._closed:
            return
        done = threading.Event() if name == "stop" else None
        self._queue.put((name, doc, done))
        if done is not None and not done.wait(self.stop_timeout):
            msg = (
                f"catalog: run {doc.get('run_start', '?')[:8]} still being written after "
                f"{self.stop_timeout:.0f} s; the RunEngine goes on (the spool has the run)"
            )
            logger.warning(msg)
            self.errors.append(msg)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued document is handled; False on timeout."""
        if self._closed or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(("__flush__", None, done))
        return done.wait(timeout)

    def close(self, timeout: float | None = DEFAULT_STOP_TIMEOUT) -> None:
        """Flush, then stop the worker thread."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, doc, done = item
            try:
                if name != "__flush__":
                    self._handle(name, doc)
            except Exception as err:  # keep the worker alive
                logger.exception("catalog writer: unexpected error: %s", err)
            finally:
                if done is not None:
                    done.set()

    def _handle(self, name: str, doc: dict[str, Any]) -> None:
        run = self._index.run_of(name, doc)
        if name == "start":
            self._active.add(doc["uid"])
        if run not in self.failed_runs:
            try:
                if self._writer is None:
                    self._writer = make_tiled_writer(
                        self._make_client(), self.batch_size, ordered=self.ordered
                    )
                self._writer(name, doc)
            except Exception as err:  # TiledWriter failures must not abort runs
                msg = (
                    f"catalog: run {str(run)[:8]}: {name} document not written "
                    f"({type(err).__name__}: {_one_line(err)}); the rest of the run goes "
                    "to the spool only"
                )
                logger.warning(msg)
                self.errors.append(msg)
                if run is not None:
                    self.failed_runs.add(run)
        if name == "stop" and run is not None:
            self._active.discard(run)
            self._index.forget(run)
            if run in self.failed_runs and not self._active:
                # Drop the broken per-run state TiledWriter keeps for the abandoned run.
                self._writer = None


# --------------------------------------------------------------------------------------
# The catalog.


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
        from tiled.client.container import Container

        try:
            newest = Container.sort(self.client, ("start.scan_id", -1))
            for _, node in newest.items().head(1):
                scan_id = (node.metadata.get("start") or {}).get("scan_id")
                return int(scan_id) if isinstance(scan_id, (int, float)) else 0
        except Exception as err:  # a broken catalog must not stop a run from opening
            logger.warning("cannot read scan_ids from %s: %s", self.location, _one_line(err))
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
            for key, node in self.client.items():
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
            raise NvmriError(f"cannot list runs in {self.location}: {_one_line(err)}") from None
        rows.sort(key=lambda r: r.time, reverse=True)
        return rows[:limit] if limit is not None else rows

    def _find_key(self, uid: str) -> str:
        uid = str(uid).strip()
        if not re.fullmatch(r"[0-9A-Za-z-]+", uid):
            raise NvmriError(f"no run {uid!r} in catalog {self.location}")
        from tiled.client.container import Container
        from tiled.queries import Like

        try:
            Container.__getitem__(self.client, uid)
            return uid
        except KeyError:
            pass
        except Exception as err:
            raise NvmriError(f"cannot read catalog {self.location}: {_one_line(err)}") from None
        try:
            results = Container.search(self.client, Like("start.uid", f"{uid}%"))
            keys = list(results.keys().head(3))
        except Exception as err:
            raise NvmriError(f"cannot search catalog {self.location}: {_one_line(err)}") from None
        if not keys:
            raise NvmriError(f"no run {uid!r} in catalog {self.location}")
        if len(keys) > 1:
            shown = ", ".join(k[:8] for k in keys[:2])
            raise NvmriError(f"run uid prefix {uid!r} is ambiguous ({shown}, ...); give more of it")
        return keys[0]

    def run(self, uid: str) -> Any:
        """The ``BlueskyRun`` client of a run, by uid or unique uid prefix.

        Raises
        ------
        NvmriError
            No run, or more than one, matches.
        """
        from tiled.client.container import Container

        key = self._find_key(uid)
        return Container.__getitem__(self.client, key)

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
                            _one_line(err))
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
                f"cannot read stream {stream!r} of run {uid[:8]}: {_one_line(err)}"
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


# --------------------------------------------------------------------------------------
# Opening.


def probe(uri: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise ``NvmriError`` (one line, within ``timeout`` s) if nothing answers at ``uri``.

    Any HTTP answer, even 401 or 404, counts as reachable; tiled's own client
    retries a refused connection for up to 45 s, hence this check first.
    """
    import httpx

    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            client.get(uri)
    except httpx.HTTPError as err:
        why = _one_line(err) or type(err).__name__
        raise NvmriError(f"catalog {uri} is unreachable: {why}") from None


def _connect_remote(uri: str, api_key: str | None, timeout: float) -> tuple[Any, Callable[[], Any]]:
    from tiled.client.constructors import from_context
    from tiled.client.context import Context

    probe(uri, timeout)

    def connect() -> Any:
        context, parts = Context.from_any_uri(uri, api_key=api_key)
        if not context.authenticated and context.server_info.authentication.required:
            raise NvmriError(
                f"catalog {uri} refuses anonymous access: give an API key "
                f"(--api-key or ${ENV_API_KEY})"
            )
        return from_context(context, node_path_parts=parts, remember_me=False)

    try:
        client = connect()
    except NvmriError:
        raise
    except Exception as err:  # one line for the user
        status = _http_status(err)
        if status in (401, 403):
            raise NvmriError(f"catalog {uri} refused the API key ({status})") from None
        raise NvmriError(f"cannot open catalog {uri}: {_one_line(err)}") from None
    return client, connect


def open_catalog(
    location: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    *,
    timeout: float = CONNECT_TIMEOUT,
    create: bool = True,
) -> Catalog:
    """Open the run catalog.

    Parameters
    ----------
    location : str or path, optional
        A directory: an embedded tiled server (SQLite catalog, DuckDB tables,
        zarr arrays in files) on 127.0.0.1 in a thread of this process, created
        if new, reopened if it exists; or, if another process already serves
        that directory, that process's server (see ``_shared.py``). An
        ``http(s)://`` URI: a facility tiled server (an ``?api_key=`` in the URI
        is taken as the key). Default:
        ``$NVMRI_CATALOG`` or ``~/.local/share/nvmri/catalog``.
    api_key : str, optional
        Key for a facility server; default ``$NVMRI_API_KEY`` (tiled also
        reads ``$TILED_API_KEY``). Ignored for a directory.
    timeout : float
        Seconds before a facility server that does not answer is unreachable.
    create : bool
        Create a missing catalog directory (default); if False, a missing one is
        an ``NvmriError``.

    Returns
    -------
    Catalog

    Raises
    ------
    NvmriError
        Unreachable server, refused key, unusable directory (one line).
    """
    if location is None:
        location = default_location()
    if is_uri(location):
        uri, key_in_uri = _split_key(str(location))
        key = api_key or key_in_uri or default_api_key()
        client, connect = _connect_remote(uri, key, timeout)
        return Catalog(client, uri, None, make_client=connect)

    from tiled.client import from_uri

    from ._shared import serve_or_join

    directory = Path(location).expanduser().resolve()
    if directory.exists() and not directory.is_dir():
        raise NvmriError(f"catalog location {directory} is a file, not a directory")
    if not create and not (directory / "catalog.db").is_file():
        raise NvmriError(f"no catalog at {directory} (give --catalog DIR|URI)")
    server, uri, key = serve_or_join(directory)
    try:

        def connect() -> Any:
            return from_uri(uri, api_key=key, remember_me=False)

        client = connect()
    except BaseException:
        if server is not None:
            server.close()
        raise
    return Catalog(client, str(directory), server, make_client=connect)


# --------------------------------------------------------------------------------------
# Importing a spool.


@dataclass(frozen=True)
class ImportResult:
    """What ``import_spool`` did with one spool file."""

    path: str
    uid: str
    action: str  # imported | replaced | present | failed | empty
    events: int
    detail: str = ""


def _write_documents(client: Any, docs: list[tuple[str, dict[str, Any]]]) -> None:
    writer = make_tiled_writer(client, batch_size=10_000)
    for name, doc in docs:
        writer(name, doc)


def import_spool(
    path: str | Path,
    catalog: Catalog | str | os.PathLike[str],
    api_key: str | None = None,
) -> list[ImportResult]:
    """Load spool file(s) into a catalog, idempotently.

    Parameters
    ----------
    path : str or Path
        A spool file, or a directory of them (``*.jsonl``).
    catalog : Catalog or location
        An open :class:`Catalog`, or a location for :func:`open_catalog`.
    api_key : str, optional
        For a facility location.

    Returns
    -------
    list of ImportResult
        One per file. A run already complete in the catalog (it has its stop
        document) is ``present`` and left alone; a partial one (a writer
        failure mid-run) is deleted and written again from the spool
        (``replaced``; needs the ``delete:node`` scope on a facility server); a
        spool that ends without a stop document (the acquiring process died)
        gets a stop document with ``exit_status`` ``abort`` and a reason. A
        truncated last line is ignored.
    """
    files = spool_files(path)
    if not isinstance(catalog, Catalog):
        with open_catalog(catalog, api_key) as opened:
            return import_spool(path, opened)
    results: list[ImportResult] = []
    for file in files:
        results.append(_import_file(file, catalog))
    return results


def _import_file(file: Path, catalog: Catalog) -> ImportResult:
    from tiled.client.container import Container

    try:
        docs = list(read_spool(file))
    except NvmriError as err:
        return ImportResult(str(file), "", "failed", 0, str(err))
    if not docs:
        return ImportResult(str(file), "", "empty", 0, "no documents")
    if docs[0][0] != "start":
        return ImportResult(str(file), "", "failed", 0, "does not begin with a start document")
    uid = docs[0][1]["uid"]
    gaps = spool_gaps(file)
    detail = "; ".join(f"missing: {gap}" for gap in gaps)
    if not any(name == "stop" for name, _ in docs):
        docs.append(("stop", synthesize_stop(docs, gaps)))
        detail = "; ".join(d for d in ("no stop document in the spool; closed as aborted",
                                       detail) if d)
    events = sum(count_events(docs).values())
    action = "imported"
    try:
        existing = Container.__getitem__(catalog.client, uid)
    except KeyError:
        existing = None
    except Exception as err:
        return ImportResult(str(file), uid, "failed", events, _one_line(err))
    if existing is not None:
        if existing.metadata.get("stop"):
            return ImportResult(
                str(file), uid, "present", events, "already complete in the catalog"
            )
        try:
            catalog.client.delete_contents(uid, recursive=True, external_only=False)
        except Exception as err:
            status = _http_status(err)
            why = (
                "the API key lacks the delete:node scope"
                if status in (401, 403)
                else _one_line(err)
            )
            return ImportResult(
                str(file), uid, "failed", events, f"partial run in the catalog not replaced: {why}"
            )
        action = "replaced"
    try:
        _write_documents(catalog.client, docs)
    except Exception as err:
        return ImportResult(
            str(file), uid, "failed", events, f"{type(err).__name__}: {_one_line(err)}"
        )
    return ImportResult(str(file), uid, action, events, detail)


def repair_from_spool(catalog: Catalog, spool_path: str | Path) -> tuple[bool, str]:
    """Make the catalog's copy of a spooled run equal to its spool, or say why not.

    The spool is the write-ahead record of every document: a run whose stored
    copy differs from it (:func:`~._verify.verify_run`; e.g. an event table that
    a concurrent writer left empty) is deleted and written again from the
    spool, then verified once more.

    Returns
    -------
    (bool, str)
        Whether the catalog now equals the spool, and a one-line account
        (empty when it was right from the start).
    """
    from ._verify import verify_run

    first = verify_run(catalog, spool_path)
    if first.ok:
        return True, ""
    found = f"run {first.uid[:8]}: the catalog differed from the spool ({first.details[0]})"
    try:
        catalog.forget(first.uid)
        catalog.client.delete_contents(first.uid, recursive=True, external_only=False)
        _write_documents(catalog.client, list(read_spool(spool_path)))
    except Exception as err:
        return False, f"{found}; not rewritten: {_one_line(err)}"
    again = verify_run(catalog, spool_path)
    if again.ok:
        return True, f"{found}; rewritten from the spool and verified"
    return False, f"{found}; rewritten from the spool but still differs ({again.details[0]})"


# --------------------------------------------------------------------------------------
# CLI helpers (the `nvmri` command prints what these return).


def format_runs(rows: list[RunRow]) -> str:
    """The ``nvmri runs`` table."""
    header = ("uid", "time", "plan", "scenario", "points", "status")
    lines = [
        (
            r.uid[:8],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time)),
            r.plan or "-",
            r.scenario or "-",
            "-" if r.points is None else str(r.points),
            r.status,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(
        f"{{:{'>' if h == 'points' else '<'}{w}}}" for h, w in zip(header, widths, strict=True)
    )
    out = [fmt.format(*header)] + [fmt.format(*line) for line in lines]
    return "\n".join(s.rstrip() for s in out)


def cli_runs(location: str | None, api_key: str | None = None) -> str:
    """``nvmri runs``: the runs of a catalog as a printable table (newest first)."""
    with open_catalog(location, api_key, create=False) as catalog:
        rows = catalog.runs()
        if not rows:
            return f"no runs in catalog {catalog.location}"
        return format_runs(rows)


def cli_import(spool: str | Path, location: str | None, api_key: str | None = None) -> str:
    """``nvmri import``: load spool file(s) into a catalog; a printable summary.

    Raises
    ------
    NvmriError
        If any file failed (the message summarises which and why).
    """
    results = import_spool(spool, location if location is not None else default_location(), api_key)
    lines = [
        f"{(r.uid[:8] or '-'):<8}  {r.action:<8}  {r.events:>6} events  {Path(r.path).name}"
        + (f"  ({r.detail})" if r.detail else "")
        for r in results
    ]
    failed = [r for r in results if r.action == "failed"]
    if failed:
        first = failed[0]
        raise NvmriError(
            f"{len(failed)} of {len(results)} spool file(s) not imported; "
            f"{Path(first.path).name}: {first.detail}"
        )
    counts = {a: sum(r.action == a for r in results) for a in ("imported", "replaced", "present")}
    lines.append(
        f"{len(results)} file(s): {counts['imported']} imported, {counts['replaced']} replaced, "
        f"{counts['present']} already present"
    )
    return "\n".join(lines)
