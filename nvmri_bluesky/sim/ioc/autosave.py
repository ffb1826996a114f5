"""Stage positions and soft limits kept across IOC restarts (as EPICS autosave)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = [
    "Autosave",
]

logger = logging.getLogger("nvmri_bluesky.sim.ioc")


class Autosave:
    """Stage positions and soft limits kept in a JSON file across IOC restarts.

    As EPICS autosave does for a motor's ``.VAL``/``.LLM``/``.HLM``.  Without a
    path nothing is kept.  Saved values outside the scenario's travel are
    ignored (with a log line).

    Parameters
    ----------
    path : str or Path, optional
        The file (written atomically after every move and limit change).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self._data: dict[str, dict[str, float]] = self._read()

    def _read(self) -> dict[str, dict[str, float]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text()[:100_000])
        except (OSError, ValueError) as exc:
            logger.warning("autosave %s unreadable, not restored: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def axis(self, axis: str, travel: tuple[float, float]) -> dict[str, float]:
        """The saved ``position``, ``llm``, ``hlm`` of ``axis`` (nm) that fit ``travel``."""
        saved = self._data.get(axis)
        if not isinstance(saved, dict):
            return {}
        try:
            values = {k: float(saved[k]) for k in ("position", "llm", "hlm")}
        except (KeyError, TypeError, ValueError):
            return {}
        lo, hi = travel
        if not (lo <= values["llm"] < values["hlm"] <= hi
                and values["llm"] <= values["position"] <= values["hlm"]):
            logger.warning("autosave %s: %s %s does not fit the travel %s; not restored",
                           self.path, axis, values, travel)
            return {}
        return values

    def store(self, axis: str, **values: float) -> None:
        """Save ``values`` (position, llm, hlm, nm) of ``axis``."""
        if self.path is None or self._data.get(axis) == values:
            return
        self._data[axis] = values
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self._data))
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("autosave %s not written: %s", self.path, exc)
