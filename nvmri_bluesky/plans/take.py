"""Run a measurement plan inside another and get its data as it was emitted.

A protocol step (:mod:`.protocol`) decides its next run from the data just
taken: :func:`take` keeps the run's start, primary events and stop as the
documents go by and returns them as a dataset (what the instrument gives,
nothing else).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import bluesky.preprocessors as bpp
import xarray as xr

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.runs import run_dataset


class _Collector:
    """Keeps one run's start, primary events and stop as they are emitted."""

    def __init__(self) -> None:
        self.start: dict | None = None
        self.stop: dict | None = None
        self.events: list[dict] = []
        self._primary: str | None = None

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            self.start, self.events, self._primary = doc, [], None
        elif name == "descriptor" and doc.get("name") == "primary":
            self._primary = doc["uid"]
        elif name == "event" and doc["descriptor"] == self._primary:
            self.events.append(doc)
        elif name == "stop":
            self.stop = doc


def take(plan: Generator) -> Generator[Any, Any, tuple[str, xr.Dataset]]:
    """Run a measurement plan and return (uid, its data as a dataset)."""
    collector = _Collector()
    yield from bpp.subs_wrapper(plan, collector)
    if collector.start is None:
        raise NvmriError("the measurement produced no run")
    return collector.start["uid"], run_dataset(collector.start, collector.events,
                                               collector.stop)
