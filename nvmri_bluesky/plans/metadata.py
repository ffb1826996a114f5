"""Start-document metadata, assembled once per run."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import nvmri_bluesky
from nvmri_bluesky import pulses


def device_prefix(devices: Any) -> str:
    """The PV prefix the instrument was built from (best effort)."""
    prefix = getattr(devices, "prefix", None)
    if prefix is None:
        motor_prefix = getattr(devices.stage.x, "prefix", "")
        prefix = motor_prefix.split("STAGE:")[0]
    return str(prefix)


def run_metadata(devices: Any, plan_name: str, plan_args: Mapping[str, Any],
                 programs: Iterable[pulses.Program] = (), grid: Mapping[str, Any] | None = None,
                 md: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The start document's metadata: plan, arguments, programs, grid, prefix, version.

    Parameters
    ----------
    devices
        The instrument the plan runs on (for the PV prefix).
    plan_name : str
    plan_args : mapping
        The plan's arguments (JSON-able values, SI units in the names).
    programs : iterable of Program
        Every pulse program the run loads.
    grid : mapping, optional
        For rasters: ``shape``, ``axes``, ``extents`` (nm), ``snake``.
    md : mapping, optional
        The caller's metadata; it wins over ours.
    """
    out: dict[str, Any] = {
        "plan_name": plan_name,
        "plan_args": {k: _jsonable(v) for k, v in plan_args.items()},
        "programs": {p.name: p.to_dict() for p in programs},
        "prefix": device_prefix(devices),
        "nvmri_version": nvmri_bluesky.__version__,
    }
    if grid is not None:
        out["grid"] = dict(grid)
    out.update(md or {})
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)
