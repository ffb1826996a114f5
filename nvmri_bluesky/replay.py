"""Replay a stored run through the live callbacks and redraw its figures."""

from __future__ import annotations

from pathlib import Path

from nvmri_bluesky.callbacks import LiveSlices
from nvmri_bluesky.errors import NvmriError


def replay(uid: str, location: str | None, api_key: str | None = None,
           out_dir: str | Path = ".") -> list[Path]:
    """Feed run ``uid``'s documents, in order, through :class:`LiveSlices`.

    Parameters
    ----------
    uid : str
        Run uid or a unique prefix.
    location : str
        Catalog directory or URI.
    api_key : str, optional
        For a facility catalog.
    out_dir : path
        Where the redrawn figures are written.

    Returns
    -------
    list of Path
        The figures written.
    """
    from nvmri_bluesky.catalog import open_catalog

    slices = LiveSlices(out_dir=out_dir)
    with open_catalog(location, api_key=api_key) as cat:
        for name, doc in cat.documents(uid):
            slices(name, doc)
    if not slices.saved:
        raise NvmriError(f"run {uid} has no raster to draw (replay draws rasters' slices)")
    return slices.saved
