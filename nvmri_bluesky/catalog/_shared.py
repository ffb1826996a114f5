"""One embedded server per catalog directory, shared by every process that opens it.

DuckDB (the event tables) admits one writing process per file: two embedded
servers over one directory break each other (``Could not set lock on file
".../storage.duckdb": Conflicting lock is held``). So the first process that
opens a directory serves it and publishes where; every later process, reader
or writer, goes through that server:

``<dir>/api_key``
    The directory's key (created once, mode 0600): the same in every session,
    so a tiled profile stays valid.
``<dir>/server.json``
    ``{"uri", "port", "pid", "host"}`` of the serving process; ``pid`` is
    null once it has stopped (the port is kept: the next server takes it again
    if it is free, so the address is stable).
``<dir>/profiles/nvmri.yml``
    A tiled client profile for that address and key:
    ``TILED_PROFILES=<dir>/profiles`` then ``tiled.client.from_profile("nvmri")``.
``<dir>/server.lock``
    ``flock``-ed while a process decides whether to serve, so two processes
    opening at once never start two servers.

A published server that no longer answers (its process died) is replaced by
the next opener. The serving process serves for as long as it runs: its
catalog's ``close()`` (or its exit) stops the server and unpublishes it, and
processes still connected through it get connection errors (their writers
fall back to the spool; readers open the catalog again). Keep the
longest-lived process (the queue worker, an IPython session) the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.net import LOOPBACK

KEY_FILE = "api_key"
SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"
PROFILE_DIR = "profiles"
PROFILE_NAME = "nvmri"


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold ``<dir>/server.lock`` exclusively (blocks while another process holds it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def directory_key(directory: Path) -> str:
    """The directory's API key, created (mode 0600) on first use."""
    path = directory / KEY_FILE
    if path.is_file():
        key = path.read_text(encoding="utf-8").strip()
        if key.isalnum():
            return key
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key


def next_counter(directory: Path, name: str, at_least: int) -> int:
    """Increment the counter file ``<dir>/<name>`` (under the lock); the new value.

    The new value is larger than ``at_least`` and than the stored one.
    """
    path = directory / name
    with directory_lock(directory):
        try:
            stored = int(path.read_text(encoding="utf-8").strip() or 0)
        except (OSError, ValueError):
            stored = 0
        value = max(stored, int(at_least)) + 1
        _write_atomically(path, f"{value}\n")
    return value


def _read_server_file(directory: Path) -> dict[str, Any]:
    try:
        info = json.loads((directory / SERVER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _answers(uri: str, api_key: str, timeout: float = 3.0) -> bool:
    import httpx

    try:
        with httpx.Client(trust_env=False, timeout=timeout) as client:
            response = client.get(f"{uri}/", headers={"Authorization": f"Apikey {api_key}"})
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def live_server(directory: Path, api_key: str) -> dict[str, Any] | None:
    """The published server of ``directory`` if it answers with ``api_key``, else None."""
    info = _read_server_file(directory)
    if not info.get("pid") or not isinstance(info.get("uri"), str):
        return None
    if info["pid"] == os.getpid():
        return None  # this process's own server is found through its Catalog
    return info if _answers(info["uri"], api_key) else None


def preferred_port(directory: Path) -> int:
    """The port the directory was served on last, if it is free now; else 0 (any)."""
    port = _read_server_file(directory).get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        return 0
    with socket.socket() as sock:
        # As uvicorn binds: a port the last server left in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return 0
    return port


def profile_text(uri: str, api_key: str) -> str:
    """A tiled client profile (YAML) named ``nvmri`` for ``uri`` with ``api_key``."""
    return (
        "# Written by nvmri_bluesky for this catalog directory's embedded server.\n"
        "# TILED_PROFILES=<this directory> python -c \"from tiled.client import from_profile; "
        "print(from_profile('nvmri'))\"\n"
        f"{PROFILE_NAME}:\n"
        f"  uri: {uri}?api_key={api_key}\n"  # tiled's client moves it into the header
    )


def publish(directory: Path, uri: str, port: int, api_key: str) -> None:
    """Announce this process's server of ``directory`` (and write the tiled profile)."""
    info = {"uri": uri, "port": port, "pid": os.getpid(), "host": socket.gethostname()}
    _write_atomically(directory / SERVER_FILE, json.dumps(info, indent=1) + "\n")
    profiles = directory / PROFILE_DIR
    profiles.mkdir(exist_ok=True)
    fd = os.open(profiles / f"{PROFILE_NAME}.yml", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(profile_text(uri, api_key))


def unpublish(directory: Path) -> None:
    """Mark this process's server of ``directory`` stopped (the port stays for the next)."""
    with directory_lock(directory):
        info = _read_server_file(directory)
        if info.get("pid") == os.getpid():
            info["pid"] = None
            _write_atomically(directory / SERVER_FILE, json.dumps(info, indent=1) + "\n")


def serve_or_join(directory: Path) -> tuple[Any, str, str]:
    """Serve ``directory`` here, or join the server another process publishes.

    Returns
    -------
    (EmbeddedServer or None, uri, api_key)
        The server when this process serves (the caller closes it), else None.
    """
    from ._embedded import EmbeddedServer

    with directory_lock(directory):
        key = directory_key(directory)
        info = live_server(directory, key)
        if info is not None:
            return None, info["uri"], key
        port = preferred_port(directory)
        try:
            server = EmbeddedServer(directory, port=port, api_key=key)
        except NvmriError:
            if not port:
                raise
            server = EmbeddedServer(directory, port=0, api_key=key)  # the port was taken
        publish(directory, server.uri, int(server.base_url.rsplit(":", 1)[1]), key)
        return server, server.uri, key
