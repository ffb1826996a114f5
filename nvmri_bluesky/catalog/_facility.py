"""The facility tiled server: catalog and tables on PostgreSQL, arrays in files, keys with scopes.

``profile_collection/tiled/config.yml`` is a plain tiled server configuration
(``tiled serve config`` runs it as well); :func:`serve_catalog` adds what a
deployment script wants: the environment is checked first (a missing variable
is one line, not a traceback), missing PostgreSQL databases and the data
directory are created, and the server binds to 127.0.0.1 unless told otherwise.

Access is by API key only. The config has one password login, ``admin``
(``$NVMRI_TILED_ADMIN_PASSWORD``), which exists to mint keys:
:func:`create_api_key` logs in as admin, creates a service principal and gives
it a key restricted to the scopes asked for (:data:`WRITE_SCOPES` for the
instrument, :data:`READ_SCOPES` for analysis). Anonymous access is refused.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from nvmri_bluesky.errors import NvmriError

from ._common import one_line
from ._embedded import init_catalog_database
from ._open import probe

#: The config shipped with the package's profile.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "profile_collection" / "tiled" / "config.yml"
#: Scopes of the instrument's key: read, create runs, write their data and metadata.
WRITE_SCOPES = ("read:metadata", "read:data", "create:node", "write:metadata", "write:data")
#: Seconds an admin request (minting a key) may take on a busy server.
ADMIN_TIMEOUT = 30.0
#: Scopes of an analysis key.
READ_SCOPES = ("read:metadata", "read:data")
#: Scopes that also let ``nvmri import`` replace a partial run (deletes it first).
IMPORT_SCOPES = (*WRITE_SCOPES, "delete:node", "delete:revision")

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def config_variables(config_path: str | Path) -> list[str]:
    """The environment variables a config file refers to (``${NAME}``), in order."""
    text = Path(config_path).read_text(encoding="utf-8")
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    names: list[str] = []
    for match in _ENV_PATTERN.finditer(body):
        name = match.group(1) or match.group(2)
        if name not in names:
            names.append(name)
    return names


def check_environment(config_path: str | Path) -> None:
    """Raise ``NvmriError`` naming every variable the config needs and the environment lacks."""
    missing = [name for name in config_variables(config_path) if not os.environ.get(name)]
    if missing:
        raise NvmriError(
            f"tiled config {config_path} needs environment variable(s) {', '.join(missing)} "
            "(see docs/catalog.md)"
        )


def _postgres_uris(config: Any) -> list[str]:
    uris: list[str] = []
    for tree in config.trees or []:
        args = tree.args or {}
        for value in [args.get("uri"), *(args.get("writable_storage") or [])]:
            if isinstance(value, str) and value.startswith(("postgresql", "postgres:")):
                uris.append(value)
    database = getattr(config, "database", None)
    if database is not None and getattr(database, "uri", None):
        if str(database.uri).startswith(("postgresql", "postgres:")):
            uris.append(str(database.uri))
    return uris


def _plain_postgres(uri: str) -> str:
    parts = urlparse(uri)
    return urlunparse(parts._replace(scheme="postgresql"))


async def _create_databases(uris: Sequence[str]) -> list[str]:
    import asyncpg

    created: list[str] = []
    for uri in uris:
        plain = _plain_postgres(uri)
        parts = urlparse(plain)
        name = parts.path.lstrip("/")
        if not name:
            continue
        admin_uri = urlunparse(parts._replace(path="/postgres", query=""))
        conn = await asyncpg.connect(admin_uri, timeout=10)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{name}"')
                created.append(name)
        finally:
            await conn.close()
    return created


def _data_dirs(config: Any) -> list[Path]:
    dirs: list[Path] = []
    for tree in config.trees or []:
        for value in (tree.args or {}).get("writable_storage") or []:
            text = str(value)
            if "://" not in text or text.startswith("file:"):
                dirs.append(Path(urlparse(text).path if text.startswith("file:") else text))
    return dirs


def load_config(config_path: str | Path, prepare: bool = True) -> Any:
    """Parse a tiled server config (env checked); optionally create its databases and dirs.

    Parameters
    ----------
    config_path : str or Path
        A tiled config file (or directory of them).
    prepare : bool
        Create missing PostgreSQL databases (via the server's ``postgres``
        database) and the file-storage directories.

    Returns
    -------
    tiled.config.Config
    """
    from tiled.config import parse_configs

    path = Path(config_path)
    if not path.exists():
        raise NvmriError(f"no tiled config at {path}")
    if path.is_file():
        check_environment(path)
    try:
        config = parse_configs(path)
    except Exception as err:  # pydantic errors are long
        first = str(err).strip().splitlines()
        raise NvmriError(f"invalid tiled config {path}: {' '.join(first[:3])}") from None
    if prepare:
        for directory in _data_dirs(config):
            directory.mkdir(parents=True, exist_ok=True)
        uris = _postgres_uris(config)
        try:
            if uris:
                asyncio.run(_create_databases(uris))
            # Initialise catalog databases here, in-process: tiled's own
            # init_if_not_exists spawns `python -m tiled catalog init` (seconds).
            for tree in config.trees or []:
                args = tree.args or {}
                if args.get("init_if_not_exists") and isinstance(args.get("uri"), str):
                    init_catalog_database(args["uri"])
                    args["init_if_not_exists"] = False
        except Exception as err:
            raise NvmriError(f"cannot prepare the catalog databases: {one_line(err)}") from None
    return config


def serve_catalog(
    config_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    prepare: bool = True,
) -> None:
    """Run the facility tiled server in the foreground (``nvmri serve-catalog``).

    Parameters
    ----------
    config_path : str or Path, optional
        Default: ``profile_collection/tiled/config.yml``.
    host : str
        Interface to bind; loopback by default.
    port : int
        TCP port.
    prepare : bool
        Create missing databases and data directories first.
    """
    import uvicorn
    from tiled.server.app import build_app_from_config

    config = load_config(config_path or DEFAULT_CONFIG, prepare=prepare)
    app = build_app_from_config(config)
    uvicorn_kwargs = dict(config.uvicorn)
    uvicorn_kwargs.update(host=host, port=port)
    uvicorn.run(app, **uvicorn_kwargs)


def create_api_key(
    uri: str,
    scopes: Sequence[str] = WRITE_SCOPES,
    *,
    admin_password: str | None = None,
    admin_user: str = "admin",
    note: str | None = None,
    expires_in: int | None = None,
    principal: str | None = None,
    instrument: str | None = None,
) -> str:
    """Mint an API key with the given scopes on a facility server.

    Logs in with the admin password (``$NVMRI_TILED_ADMIN_PASSWORD`` by
    default), creates a service principal with role ``user`` (or uses
    ``principal``, a UUID) and returns the secret of a new key for it that is
    restricted to ``scopes``. Tokens are kept in memory only.

    Parameters
    ----------
    uri : str
        The server, e.g. ``http://127.0.0.1:8000``.
    scopes : sequence of str
        E.g. :data:`WRITE_SCOPES` or :data:`READ_SCOPES`.
    admin_password, admin_user : str
        The password login in the config.
    note : str, optional
        Label stored with the key.
    expires_in : int, optional
        Lifetime in seconds (default: no expiry).
    principal : str, optional
        Existing principal UUID to attach the key to.
    instrument : str, optional
        Bind the key to one instrument (access tag ``service:nvmri-instrument-<name>``): the
        runs it creates are that instrument's, and it cannot change another
        instrument's runs (:mod:`nvmri_bluesky.catalog._access`).

    Returns
    -------
    str
        The key's secret (shown once; store it).
    """
    from tiled.client.context import Context, password_grant

    password = admin_password or os.environ.get("NVMRI_TILED_ADMIN_PASSWORD")
    if not password:
        raise NvmriError(
            "creating an API key needs the admin password ($NVMRI_TILED_ADMIN_PASSWORD)"
        )
    base = uri.rstrip("/")
    if not base.endswith("/api/v1"):
        base += "/api/v1"
    probe(base, timeout=ADMIN_TIMEOUT)
    try:
        context = Context(base)
    except Exception as err:
        raise NvmriError(f"cannot reach catalog {uri}: {err}") from None
    try:
        providers = context.server_info.authentication.providers
        if not providers:
            raise NvmriError(f"catalog {uri} has no login provider; it cannot mint scoped keys")
        provider = providers[0]
        try:
            tokens = password_grant(
                context.http_client,
                provider.links["auth_endpoint"],
                provider.provider,
                admin_user,
                password,
            )
        except Exception as err:
            raise NvmriError(f"admin login to {uri} failed: {err}") from None
        context.configure_auth(tokens, remember_me=False)
        if principal is None:
            principal = context.admin.create_service_principal("user")["uuid"]
        tags = None
        if instrument is not None:
            from ._access import instrument_tag

            tags = [instrument_tag(instrument)]
        info = context.admin.create_api_key(
            principal, scopes=list(scopes), expires_in=expires_in, note=note, access_tags=tags
        )
        return str(info["secret"])
    except NvmriError:
        raise
    except Exception as err:
        raise NvmriError(f"cannot create an API key on {uri}: {err}") from None
    finally:
        context.close()
