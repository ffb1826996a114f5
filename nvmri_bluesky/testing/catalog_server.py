"""The facility tiled server on fresh PostgreSQL databases (``nvmri serve-catalog``)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.testing.ports import LOOPBACK, POSTGRES_URI, free_port, unique_name
from nvmri_bluesky.testing.profile import TILED_CONFIG
from nvmri_bluesky.testing.services import HttpService, base_env, spawn, stopped_on_failure

__all__ = ["CatalogServer", "start_catalog_server", "drop_databases"]


class CatalogServer(HttpService):
    """The facility tiled server (``nvmri serve-catalog``) on its own PostgreSQL databases.

    It creates its databases on first start, so :meth:`wait_ready` may take a while.

    Attributes (besides :class:`HttpService`'s ``uri``)
    ----------------------------------------------------
    db_prefix : str
        Databases ``<db_prefix>_catalog``, ``_storage``, ``_authn``.
    postgres : str
        The PostgreSQL server URI (no database).
    admin_password : str
        Password of the ``admin`` login that mints keys.
    data_dir : Path
        Array (zarr) storage.
    """

    def __init__(self, process: subprocess.Popen, log_path: Path, *, uri: str, db_prefix: str,
                 postgres: str, admin_password: str, data_dir: Path) -> None:
        super().__init__("catalog-server", process, log_path, uri)
        self.db_prefix = db_prefix
        self.postgres = postgres
        self.admin_password = admin_password
        self.data_dir = data_dir

    def ready(self) -> bool:
        """True once the server answers ``GET /api/v1/`` with 200."""
        return self._answers("/api/v1/")

    def create_api_key(self, scopes: Sequence[str] | None = None, note: str | None = None,
                       instrument: str | None = None) -> str:
        """Mint an API key with ``scopes`` (default: write scopes), maybe bound to an instrument."""
        from nvmri_bluesky.catalog import WRITE_SCOPES, create_api_key

        return create_api_key(self.uri, tuple(scopes or WRITE_SCOPES),
                              admin_password=self.admin_password, note=note,
                              instrument=instrument)

    def stop(self, timeout: float = 10.0, drop: bool = False) -> int | None:
        """Stop the server; with ``drop`` also drop its databases and data directory."""
        rc = super().stop(timeout)
        if drop:
            drop_databases(self.db_prefix, self.postgres)
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return rc


def start_catalog_server(*, port: int | None = None, db_prefix: str | None = None,
                         data_dir: str | Path | None = None, postgres: str = POSTGRES_URI,
                         config: str | Path = TILED_CONFIG, admin_password: str | None = None,
                         log_dir: str | Path | None = None, wait: bool = True,
                         timeout: float = 180.0) -> CatalogServer:
    """Start the facility tiled server on 127.0.0.1 with fresh PostgreSQL databases.

    The same as ``nvmri serve-catalog --config profile_collection/tiled/config.yml``
    with ``NVMRI_TILED_PG``, ``NVMRI_TILED_DB``, ``NVMRI_TILED_DATA_DIR``,
    ``NVMRI_TILED_SECRET_KEY`` and ``NVMRI_TILED_ADMIN_PASSWORD`` set.

    Parameters
    ----------
    port : int, optional
        Default: a free one.
    db_prefix : str, optional
        Database name prefix; default a unique one (new, empty databases).
    data_dir : path, optional
        Array storage; default a new temporary directory.
    postgres : str
        PostgreSQL server URI without database.
    config : path
        tiled server config.
    admin_password : str, optional
        Default: a random one (``CatalogServer.admin_password``).
    log_dir : path, optional
        Where ``catalog-server.log`` goes.
    wait : bool
        Wait until the server answers (else call :meth:`CatalogServer.wait_ready`).
    timeout : float
        Longest wait, s.
    """
    port = port or free_port()
    db_prefix = db_prefix or unique_name("nvmri")
    data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="nvmri-tiled-"))
    admin_password = admin_password or secrets.token_urlsafe(16)
    env = base_env()
    env.update(NVMRI_TILED_PG=postgres.rstrip("/"), NVMRI_TILED_DB=db_prefix,
               NVMRI_TILED_DATA_DIR=str(data_dir), NVMRI_TILED_SECRET_KEY=secrets.token_hex(32),
               NVMRI_TILED_ADMIN_PASSWORD=admin_password)
    cmd = [sys.executable, "-m", "nvmri_bluesky.cli", "serve-catalog", "--config", str(config),
           "--host", LOOPBACK, "--port", str(port)]
    process, log_path = spawn("catalog-server", cmd, env, Path(log_dir) if log_dir else None)
    server = CatalogServer(process, log_path, uri=f"http://{LOOPBACK}:{port}",
                           db_prefix=db_prefix, postgres=postgres.rstrip("/"),
                           admin_password=admin_password, data_dir=data_dir)
    if wait:
        with stopped_on_failure(server, drop=True):
            server.wait_ready(timeout)
    return server


def drop_databases(db_prefix: str, postgres: str = POSTGRES_URI) -> list[str]:
    """Drop the databases ``<db_prefix>_*`` (a test catalog's); return their names."""
    import asyncio

    import asyncpg

    if not db_prefix or not db_prefix.replace("_", "").isalnum():
        raise NvmriError(f"refusing to drop databases for prefix {db_prefix!r}")

    async def drop() -> list[str]:
        conn = await asyncpg.connect(f"{postgres.rstrip('/')}/postgres", timeout=10)
        try:
            rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1",
                                    db_prefix.replace("_", r"\_") + r"\_%")
            names = [r["datname"] for r in rows]
            for name in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return names
        finally:
            await conn.close()

    return asyncio.run(drop())

