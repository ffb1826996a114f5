"""Opening a catalog: an embedded tiled server for a directory, a facility server by URI."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

from nvmri_bluesky.errors import NvmriError

from ._common import (
    CONNECT_TIMEOUT,
    ENV_API_KEY,
    default_api_key,
    default_location,
    http_status,
    is_uri,
    one_line,
)
from ._reader import Catalog


def _split_key(uri: str) -> tuple[str, str | None]:
    """Remove an ``api_key`` query parameter from a URI; return (uri, key).

    tiled's ``Context`` moves such a key into a header too, but refuses one given
    both there and as ``api_key=`` (this package's key argument or
    ``$NVMRI_API_KEY`` wins), and the catalog's ``location`` must not show it.
    """
    parts = urlparse(uri)
    query = parse_qs(parts.query)
    keys = query.pop("api_key", None)
    clean = urlunparse(parts._replace(query=urlencode(query, doseq=True)))
    return clean, (keys[0] if keys else None)


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
        why = one_line(err) or type(err).__name__
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
        status = http_status(err)
        if status in (401, 403):
            raise NvmriError(f"catalog {uri} refused the API key ({status})") from None
        raise NvmriError(f"cannot open catalog {uri}: {one_line(err)}") from None
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

