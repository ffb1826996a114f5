"""The catalog writer: TiledWriter off the RunEngine's thread, event tables in ``seq_num`` order.

:class:`CatalogWriter` is what a catalog subscribes to a RunEngine; it feeds
:func:`make_tiled_writer` (below) on a worker thread.

``TiledWriter``'s event tables are read back in ``seq_num`` order here (an upstream-style fix).

The bug (issue #12): under concurrent writers to a PostgreSQL tiled server,
blocks of events came back from the catalog carrying ``counter_counts`` of
events 10-20 sequence numbers later, while their scalars were right.

The cause is in how the pieces are paired, not in what is stored:

* ``bluesky_tiled_plugins`` (2.0.12) ``_RunWriter`` stores an event stream's
  scalars (``seq_num``, ``time``, ...) as rows appended to one SQL table
  (``create_appendable_table`` + ``append_partition``) and every array data
  key (``counter_counts``, with ``max_array_size=0``) as a zarr array extended
  in event order. A reader pairs table row *i* with array row *i*.
* tiled (0.2.20) ``SQLAdapter._read_full_table_or_partition`` orders the rows
  by ``order_by_args`` + ``_partition_id`` and, for DuckDB and SQLite only, by
  ``rowid``. On PostgreSQL every row of the stream ties on ``_partition_id``
  and the row order is undefined: every dataset with the same schema shares one
  heap table, each server connection (backend) fills its own target page, so
  under concurrent appends a later batch can sit on an earlier page and a
  sequential scan returns it first. The zarr array stays in event order, so
  the rows are paired with the wrong arrays. The DuckDB (embedded) catalog is
  not affected.

tiled's fix for this is the ``order_by_args`` data-source parameter
(bluesky/tiled PR #1402, "Ensure Row Ordering in SQLAdapter"), but
``DataContainer.create_appendable_table`` does not expose it and TiledWriter
does not set it. :class:`OrderedTiledWriter` creates the event tables with
``order_by_args = [{"column": "seq_num", "direction": "asc"}]``, so every
reader (this package, a stock tiled client, databroker) gets the rows in
event order on any storage. Drop it once TiledWriter sets the parameter
itself.

A second, smaller server race: the first table of a schema is created with
``CREATE TABLE IF NOT EXISTS`` / ``CREATE INDEX IF NOT EXISTS``, which
PostgreSQL does not make safe against a concurrent twin (``duplicate key
value violates unique constraint "pg_type_typname_nsp_index"``, HTTP 500;
the server rolls the new node back). Creating the table is retried a few
times here (:data:`CREATE_ATTEMPTS`); if an attempt did create the node, the
retry finds it (409) and uses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ._common import http_status, one_line
from ._spool import RunIndex

logger = logging.getLogger(__name__)

#: Events cached by TiledWriter before it writes them to the catalog in one request.
DEFAULT_BATCH_SIZE = 500
#: Seconds the RunEngine waits, at a stop document, for the catalog writer to catch up.
DEFAULT_STOP_TIMEOUT = 60.0
#: The name under which :meth:`CatalogWriter.flush` queues its marker.
_FLUSH = "__flush__"

#: The table order of an event stream: the order of its events, as its arrays are.
EVENT_ORDER = [{"column": "seq_num", "direction": "asc"}]
#: Attempts at creating an event table when the server answers 500 (a DDL race).
CREATE_ATTEMPTS = 5


class _OrderedTables:
    """A stream container client whose ``create_appendable_table`` orders rows by seq_num."""

    def __init__(self, node: Any) -> None:
        self._node = node

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def create_appendable_table(
        self,
        schema: Any,
        npartitions: int = 1,
        *,
        key: str | None = None,
        metadata: dict | None = None,
        specs: list | None = None,
        access_tags: list[str] | None = None,
        table_name: str | None = None,
    ) -> Any:
        """``Container.create_appendable_table`` plus ``order_by_args`` on ``seq_num``."""
        from tiled.client.base import BaseClient
        from tiled.structures.core import StructureFamily
        from tiled.structures.data_source import DataSource
        from tiled.structures.table import TableStructure

        parameters: dict[str, Any] = {}
        if "seq_num" in schema.names:
            parameters["order_by_args"] = EVENT_ORDER
        if table_name is not None:
            parameters["table_name"] = table_name
        data_source = DataSource(
            structure=TableStructure.from_schema(schema, npartitions),
            structure_family=StructureFamily.table,
            mimetype="application/x-tiled-sql-table",
            parameters=parameters,
        )
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            try:
                client: BaseClient = self._node.new(
                    StructureFamily.table,
                    [data_source],
                    key=key,
                    metadata=metadata or {},
                    specs=specs or [],
                    access_tags=access_tags,
                )
                return client
            except Exception as err:
                status = http_status(err)
                if status == 409 and key is not None and attempt > 1:
                    return self._node[key]  # an earlier attempt created it after all
                if status != 500 or attempt == CREATE_ATTEMPTS:
                    raise
                logger.warning("creating event table %r: server error 500 (attempt %d of %d); "
                               "retrying", key, attempt, CREATE_ATTEMPTS)
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")


def _ordered_run_writer_class() -> type:
    from bluesky_tiled_plugins.writing.tiled_writer import _RunWriter

    class OrderedRunWriter(_RunWriter):
        """``_RunWriter`` that creates its event tables ordered by ``seq_num``."""

        def descriptor(self, doc: dict[str, Any]) -> None:
            super().descriptor(doc)
            node = self._desc_nodes[doc["uid"]]
            if not isinstance(node, _OrderedTables):
                wrapped = _OrderedTables(node)
                self._desc_nodes[doc["uid"]] = self._desc_nodes[doc["name"]] = wrapped

    return OrderedRunWriter


def make_ordered_tiled_writer(client: Any, batch_size: int, max_array_size: int = 0) -> Any:
    """A ``bluesky_tiled_plugins.TiledWriter`` whose runs use :class:`OrderedRunWriter`.

    Parameters
    ----------
    client : tiled client
        The catalog root.
    batch_size : int
        Events cached per table/array write.
    max_array_size : int
        Arrays larger than this go to zarr (0: every array).

    Returns
    -------
    bluesky_tiled_plugins.TiledWriter
    """
    from bluesky_tiled_plugins import TiledWriter

    run_writer_class = _ordered_run_writer_class()

    class OrderedTiledWriter(TiledWriter):
        def _factory(self, name: str, doc: dict[str, Any]) -> Any:
            # TiledWriter._factory with the ordered run writer (this package sets no
            # backup directory, so that branch of the original is left out).
            run_writer = run_writer_class(
                self.client,
                batch_size=self._batch_size,
                max_array_size=self._max_array_size,
                validate=self._validate,
                ignore_errors=self.ignore_errors,
            )
            callback = run_writer
            if self._normalizer:
                callback = self._normalizer(
                    patches=self.patches, spec_to_mimetype=self.spec_to_mimetype
                )
                callback.subscribe(run_writer)
            return [callback], []

    return OrderedTiledWriter(client, batch_size=batch_size, max_array_size=max_array_size)


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
# The catalog writer: TiledWriter behind bluesky's BufferingWrapper (one worker thread);
# its failures never reach the RE.


class CatalogWriter:
    """A RunEngine callback that feeds TiledWriter on a worker thread.

    Documents are queued (``bluesky.callbacks.buffer.BufferingWrapper``) and
    written in order on its one worker thread, so the RunEngine
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
        from bluesky.callbacks.buffer import BufferingWrapper

        self._make_client = make_client
        self.batch_size = batch_size
        self.ordered = ordered
        self.stop_timeout = stop_timeout
        self.errors: list[str] = []
        self.failed_runs: set[str] = set()
        self._index = RunIndex()
        self._active: set[str] = set()
        self._writer: Any = None
        self._closed = False
        # One worker thread, documents in order; each item is (doc, event set once handled).
        self._buffer = BufferingWrapper(self._work)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if self._closed:
            return
        done = threading.Event() if name == "stop" else None
        self._buffer(name, (doc, done))
        if done is not None and not done.wait(self.stop_timeout):
            msg = (
                f"catalog: run {doc.get('run_start', '?')[:8]} still being written after "
                f"{self.stop_timeout:.0f} s; the RunEngine goes on (the spool has the run)"
            )
            logger.warning(msg)
            self.errors.append(msg)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued document is handled; False on timeout."""
        if self._closed:
            return True
        done = threading.Event()
        self._buffer(_FLUSH, (None, done))
        return done.wait(timeout)

    def close(self, timeout: float | None = DEFAULT_STOP_TIMEOUT) -> None:
        """Flush, then stop the worker thread (it ends once the queue is empty)."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._buffer.shutdown(wait=False)

    def _work(self, name: str, item: tuple[dict[str, Any] | None, threading.Event | None]) -> None:
        doc, done = item
        try:
            if name != _FLUSH:
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
                    f"({type(err).__name__}: {one_line(err)}); the rest of the run goes "
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
