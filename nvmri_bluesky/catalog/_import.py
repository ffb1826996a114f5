"""Importing a spool into a catalog, and repairing a run from its spool."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError

from ._common import http_status, one_line
from ._open import open_catalog
from ._reader import Catalog
from ._spool import count_events, read_spool, spool_files, spool_gaps, synthesize_stop
from ._writer import make_tiled_writer


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
        # The exact key: CatalogOfBlueskyRuns.__getitem__ would fall back to a prefix match.
        existing = Container.__getitem__(catalog.client, uid)
    except KeyError:
        existing = None
    except Exception as err:
        return ImportResult(str(file), uid, "failed", events, one_line(err))
    if existing is not None:
        if existing.metadata.get("stop"):
            return ImportResult(
                str(file), uid, "present", events, "already complete in the catalog"
            )
        try:
            catalog.client.delete_contents(uid, recursive=True, external_only=False)
        except Exception as err:
            status = http_status(err)
            why = (
                "the API key lacks the delete:node scope"
                if status in (401, 403)
                else one_line(err)
            )
            return ImportResult(
                str(file), uid, "failed", events, f"partial run in the catalog not replaced: {why}"
            )
        action = "replaced"
    try:
        _write_documents(catalog.client, docs)
    except Exception as err:
        return ImportResult(
            str(file), uid, "failed", events, f"{type(err).__name__}: {one_line(err)}"
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
        return False, f"{found}; not rewritten: {one_line(err)}"
    again = verify_run(catalog, spool_path)
    if again.ok:
        return True, f"{found}; rewritten from the spool and verified"
    return False, f"{found}; rewritten from the spool but still differs ({again.details[0]})"

