"""Run catalog: an embedded tiled server by default, a facility tiled server by URI.

Writing goes through ``bluesky_tiled_plugins.TiledWriter`` (on a worker thread,
failures never reach the RunEngine) and, independently, through a per-run
JSON-lines spool that :func:`import_spool` can load into any catalog.
See ``docs/catalog.md``. What the ``nvmri`` command prints is made in
:mod:`nvmri_bluesky.cli` (``cli_runs``, ``cli_import``, ``cli_verify``).
"""

from ._common import (
    DEFAULT_CATALOG_DIR,
    default_api_key,
    default_location,
    default_spool_dir,
    is_uri,
)
from ._embedded import EmbeddedServer
from ._facility import (
    DEFAULT_CONFIG,
    IMPORT_SCOPES,
    READ_SCOPES,
    WRITE_SCOPES,
    check_environment,
    create_api_key,
    load_config,
    serve_catalog,
)
from ._import import ImportResult, import_spool, repair_from_spool
from ._open import open_catalog, probe
from ._reader import Catalog, RunRow, run_table
from ._spool import SpoolWriter, read_spool, spool_files
from ._verify import VerifyResult, find_spool, verify_all, verify_run
from ._writer import (
    DEFAULT_BATCH_SIZE,
    EVENT_ORDER,
    CatalogWriter,
    make_ordered_tiled_writer,
    make_tiled_writer,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CATALOG_DIR",
    "DEFAULT_CONFIG",
    "IMPORT_SCOPES",
    "READ_SCOPES",
    "WRITE_SCOPES",
    "EVENT_ORDER",
    "Catalog",
    "CatalogWriter",
    "EmbeddedServer",
    "ImportResult",
    "RunRow",
    "SpoolWriter",
    "VerifyResult",
    "check_environment",
    "repair_from_spool",
    "create_api_key",
    "default_api_key",
    "default_location",
    "default_spool_dir",
    "find_spool",
    "import_spool",
    "is_uri",
    "load_config",
    "make_ordered_tiled_writer",
    "make_tiled_writer",
    "open_catalog",
    "probe",
    "read_spool",
    "run_table",
    "serve_catalog",
    "spool_files",
    "verify_all",
    "verify_run",
]
