"""Where the catalog is (environment, defaults) and one-line error text, for the catalog."""

from __future__ import annotations

import os
from pathlib import Path

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


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)

