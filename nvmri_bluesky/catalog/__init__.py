"""Run catalog: an embedded tiled server by default, a facility tiled server by URI.

Writing goes through ``bluesky_tiled_plugins.TiledWriter`` (on a worker thread,
failures never reach the RunEngine) and, independently, through a per-run
JSON-lines spool that :func:`import_spool` can load into any catalog.
See ``docs/catalog.md``.
"""

from ._catalog import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CATALOG_DIR,
    Catalog,
    CatalogWriter,
    ImportResult,
    RunRow,
    cli_import,
    cli_runs,
    default_api_key,
    default_location,
    default_spool_dir,
    format_runs,
    import_spool,
    is_uri,
    make_tiled_writer,
    open_catalog,
    probe,
    repair_from_spool,
    run_table,
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
from ._spool import SpoolWriter, read_spool, spool_files
from ._verify import VerifyResult, cli_verify, find_spool, verify_all, verify_run
from ._writer import EVENT_ORDER, make_ordered_tiled_writer

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
    "cli_import",
    "cli_runs",
    "cli_verify",
    "repair_from_spool",
    "create_api_key",
    "default_api_key",
    "default_location",
    "default_spool_dir",
    "find_spool",
    "format_runs",
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
