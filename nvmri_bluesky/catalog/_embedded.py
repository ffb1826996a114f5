"""An embedded tiled server over a directory (SQLite catalog, DuckDB tables, zarr files).

The same layout as tiled's ``SimpleTiledServer`` (``catalog.db``, ``data/``,
``storage.duckdb``) so either can open the other's directory, plus what a
Bluesky catalog needs and ``SimpleTiledServer`` does not register:

- the ``application/json-seq`` exporter of bluesky-tiled-plugins, which is what
  ``BlueskyRun.documents()`` downloads (replay);
- the run validation router of bluesky-tiled-plugins (``run.validate()``);
- the root node carries the ``CatalogOfBlueskyRuns`` v3 spec, so clients get
  the bluesky catalog client (partial-uid and scan_id lookup);
- one DuckDB connection that only one request thread uses at a time
  (:func:`serialize_duckdb`).

It also initialises a new catalog database in-process (``SimpleTiledServer``
spawns ``python -m tiled catalog init`` on every open, which costs seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import secrets
import threading
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import httpx

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.net import LOOPBACK

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 30.0  # s; uvicorn start plus the application's startup hooks

CATALOG_DB = "catalog.db"
TABLES_DB = "storage.duckdb"
DATA_DIR = "data"


def bluesky_serialization_registry() -> Any:
    """Tiled's default serialization registry plus the BlueskyRun JSON-seq exporter."""
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry

    registry = copy.deepcopy(default_serialization_registry)
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return registry


def process_api_key() -> str:
    """The single-user API key of every embedded server in this process.

    tiled keeps the key in its process-wide settings (``build_app`` writes it
    there), so two servers in one process with different keys would lock the
    first one's clients out; all share tiled's per-process random key instead.
    """
    from tiled.server.settings import get_settings

    settings = get_settings()
    if not settings.single_user_api_key:
        settings.single_user_api_key = secrets.token_hex(32)
    return settings.single_user_api_key


def serialize_duckdb(tables_uri: str, timeout_s: float = 300.0) -> None:
    """Give the DuckDB table storage a pool of one connection, checked out exclusively.

    tiled (0.2.x) hands DuckDB storage a ``sqlalchemy.pool.StaticPool``: one
    ADBC connection shared by every request thread at the same time. The ADBC
    DuckDB connection is not thread-safe, so a read (a reconstruction, a
    replay) that overlaps appends from other writers can find its pending
    result closed by another thread (``Invalid Input Error: Attempting to
    execute an unsuccessful or closed pending query result``), come back
    empty, or crash the serving process (SIGSEGV, seen in ``nvmri demo``
    with three samples writing while a fourth reconstructed). A ``QueuePool``
    of size one keeps tiled's one connection but lets a second thread wait
    for it (up to ``timeout_s``) instead of using it concurrently. Upstream,
    the same change belongs in ``tiled.storage.SQLStorage._connection_pool``.
    """
    import sqlalchemy.pool
    from tiled.storage import get_storage

    storage = get_storage(tables_uri)
    old = storage.__dict__.get("_connection_pool")
    if isinstance(old, sqlalchemy.pool.QueuePool):
        return
    storage.__dict__["_connection_pool"] = sqlalchemy.pool.QueuePool(
        storage._adbc_connection.adbc_clone, pool_size=1, max_overflow=0, timeout=timeout_s)
    if old is not None:
        old.dispose()


def _own_settings(app: Any, api_key: str) -> None:
    """Give one tiled app its own settings, so each embedded server keeps its own key.

    tiled's ``build_app`` installs a settings dependency that writes the app's
    key into the process-wide settings object: with two servers in one
    process the last one built would lock out the first one's clients. The
    override returns a private copy instead.
    """
    import functools

    from tiled.server.settings import get_settings

    shared = app.dependency_overrides[get_settings]

    @functools.cache
    def settings_of_this_app() -> Any:
        own = shared().model_copy()
        own.single_user_api_key = api_key
        return own

    app.dependency_overrides[get_settings] = settings_of_this_app


def _run_in_fresh_thread(fn: Any) -> Any:
    """Run ``fn()`` in a new thread (its own event loop, its own SQLite handles)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller
            box["error"] = err

    thread = threading.Thread(target=target, name="nvmri-catalog-init")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def init_catalog_database(uri: str) -> None:
    """Create and stamp a tiled catalog database if it is new (no-op otherwise).

    The equivalent of ``tiled catalog init --if-not-exists URI``, in-process.
    """
    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import UninitializedDatabase, check_database, stamp_head
    from tiled.catalog.alembic_constants import ALEMBIC_DIR, ALEMBIC_INI_TEMPLATE_PATH
    from tiled.catalog.core import ALL_REVISIONS, REQUIRED_REVISION, initialize_database
    from tiled.utils import ensure_specified_sql_driver

    uri = ensure_specified_sql_driver(uri)

    async def setup() -> bool:
        engine = create_async_engine(uri)
        try:
            await check_database(engine, REQUIRED_REVISION, ALL_REVISIONS)
        except UninitializedDatabase:
            await initialize_database(engine)
            return True
        finally:
            await engine.dispose()
        return False

    def work() -> None:
        if asyncio.run(setup()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # alembic's ini format
                stamp_head(ALEMBIC_INI_TEMPLATE_PATH, ALEMBIC_DIR, uri)

    _run_in_fresh_thread(work)


class EmbeddedServer:
    """A tiled server on 127.0.0.1 (free port) in a background thread, over a directory.

    Parameters
    ----------
    directory : str or Path
        Where the catalog lives; created if missing, reopened if it exists.
    port : int
        0 (default) picks a free port.
    api_key : str, optional
        The key clients must give (default: :func:`process_api_key`).

    Attributes
    ----------
    uri : str
        ``http://127.0.0.1:PORT/api/v1`` (without the key).
    api_key : str
        Loopback only; see :func:`directory_key` for the one ``open_catalog`` uses.
    """

    def __init__(self, directory: str | Path, port: int = 0, api_key: str | None = None) -> None:
        import uvicorn
        from bluesky_tiled_plugins.routers.validator import router as validator_router
        from tiled.catalog import from_uri as catalog_from_uri
        from tiled.config import Authentication, StreamingCacheConfig
        from tiled.server.app import build_app
        from tiled.server.logging_config import LOGGING_CONFIG
        from tiled.server.simple import ThreadedServer
        from tiled.utils import ensure_uri

        self.directory = Path(directory).expanduser().resolve()
        try:
            (self.directory / DATA_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise NvmriError(f"cannot create catalog directory {self.directory}: {err}") from None
        catalog_uri = f"sqlite:///{self.directory / CATALOG_DB}"
        init_catalog_database(catalog_uri)
        self._tables_uri = ensure_uri(f"duckdb:///{self.directory / TABLES_DB}")
        self.api_key = api_key or process_api_key()

        log_config = copy.deepcopy(LOGGING_CONFIG)
        for handler, filename in (("access", "access.log"), ("default", "error.log")):
            log_config["handlers"][handler]["class"] = "logging.FileHandler"
            del log_config["handlers"][handler]["stream"]
            log_config["handlers"][handler]["filename"] = str(self.directory / filename)

        self.adapter = catalog_from_uri(
            catalog_uri,
            specs=[{"name": "CatalogOfBlueskyRuns", "version": "3.0"}],
            writable_storage=[self.directory / DATA_DIR, self._tables_uri],
            init_if_not_exists=False,
            cache_config=StreamingCacheConfig(uri="memory").model_dump(),
        )
        serialize_duckdb(self._tables_uri)
        self.app = build_app(
            self.adapter,
            authentication=Authentication(single_user_api_key=self.api_key),
            serialization_registry=bluesky_serialization_registry(),
            include_routers=[validator_router],
        )
        _own_settings(self.app, self.api_key)
        self._server = ThreadedServer(
            uvicorn.Config(
                self.app, host=LOOPBACK, port=port, loop="asyncio", log_config=log_config
            )
        )
        self._cm: contextlib.AbstractContextManager[str] = self._server.run_in_thread()
        base_url = self._cm.__enter__()
        try:
            self._wait_ready(base_url)
        except BaseException:
            self._cm.__exit__(None, None, None)
            raise
        self.base_url = base_url
        self.uri = f"{base_url}/api/v1"
        # tiled's server thread is not a daemon: stop it when the interpreter
        # shuts down (threading's exit hooks run before non-daemon threads are
        # joined; plain atexit runs after, too late), so a session can exit.
        threading._register_atexit(self.close)
        self._closed = False

    def _wait_ready(self, base_url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(trust_env=False) as client:
            while True:
                if not self._server.thread.is_alive():
                    raise NvmriError(
                        f"embedded catalog server in {self.directory} stopped during startup "
                        f"(see {self.directory / 'error.log'})"
                    )
                try:
                    if client.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                        return
                except httpx.RequestError:
                    pass
                if time.monotonic() > deadline:
                    raise NvmriError(
                        f"embedded catalog server in {self.directory} not ready after "
                        f"{STARTUP_TIMEOUT:.0f} s (see {self.directory / 'error.log'})"
                    )
                time.sleep(0.05)

    @property
    def uri_with_key(self) -> str:
        """The API URI with the key as a query parameter (for a browser or ``from_uri``)."""
        return f"{self.uri}?api_key={quote_plus(self.api_key)}"

    def close(self) -> None:
        """Stop the server thread and release the database files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        from ._shared import unpublish

        with contextlib.suppress(OSError):
            unpublish(self.directory)
        self._cm.__exit__(None, None, None)
        from tiled.storage import get_storage

        with contextlib.suppress(Exception):
            get_storage(self._tables_uri).dispose()

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EmbeddedServer {self.directory} at {self.uri}>"
