"""Runs -> xarray: the one conversion from bluesky documents to analysis arrays.

A raster becomes an ``xarray.Dataset`` on its grid (coords ``x``, ``y``, ``z``
in nm, from the start document's ``grid``); a sweep becomes a dataset on its
swept coordinate (``rf_frequency`` in Hz, ``tau`` in s, ...).  Gate counts are
unpacked from ``counter_counts`` by the gate names of the run's pulse program.
The same function serves a plan that decides its next step from the runs it
just took (documents collected in memory) and the reconstruction that reads
runs back from the catalog (:func:`load_run`).

Points a run did not reach (a run cut short) stay NaN and the dataset says so
in ``attrs["complete"]`` and ``attrs["points_measured"]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from event_model import unpack_event_page

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError

__all__ = ["run_dataset", "load_run", "RASTER_PLANS", "POINT_PLANS", "SWEEP_COORDS"]

RASTER_PLANS = ("deer_raster", "psf_map", "ramsey_raster", "esr_raster")
POINT_PLANS = ("deer_points",)
"""Plans whose events are tips in any order (adaptive points): a list of points."""
SWEEP_COORDS = {"deer_spectrum": ("rf_frequency", "Hz"), "deer_evolution": ("tau", "s"),
                "odmr_sweep": ("mw_frequency", "Hz"), "rabi": ("mw_duration", "s"),
                "ramsey": ("tau", "s"), "echo": ("tau", "s"), "deer_point": (None, None)}
_SCALARS = ("lock_frequency", "lock_error", "lock_minus_frequency", "deer_contrast",
            "lock_reacquisitions")
_ATTRS = ("tau_s", "rf_frequency_hz", "rf_duration_s", "shots", "mw_frequency_hz",
          "tau_cw_s", "f_nv0_hz", "f_minus0_hz")


def _gates(start: Mapping[str, Any]) -> list[str]:
    programs = list(start.get("programs", {}).values())
    return [g["name"] for g in programs[0]["gates"]] if programs else []


def _attrs(start: Mapping[str, Any], stop: Mapping[str, Any] | None) -> dict[str, Any]:
    args = start.get("plan_args", {})
    attrs: dict[str, Any] = {"uid": start.get("uid", ""), "plan_name": start.get("plan_name", ""),
                             "scenario": start.get("scenario", "")}
    for key in _ATTRS:
        value = start.get(key, args.get(key))
        if isinstance(value, int | float):
            attrs[key] = float(value)
    couplings = start.get("point_couplings_hz")
    if couplings is not None:
        attrs["point_couplings_hz"] = tuple(float(c) for c in couplings)
    if stop is not None:
        attrs["exit_status"] = stop.get("exit_status", "")
        attrs["stop_reason"] = stop.get("reason", "") or ""
        if isinstance(stop.get("instrument_time_s"), int | float):
            attrs["instrument_time_s"] = float(stop["instrument_time_s"])
    return attrs


def _columns(events: Sequence[Mapping[str, Any]], gates: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-event arrays: gate counts by name and the scalar readings present."""
    cols: dict[str, np.ndarray] = {}
    if events and "counter_counts" in events[0]["data"]:
        counts = np.array([np.asarray(e["data"]["counter_counts"], float)[:len(gates)]
                           for e in events])
        cols.update({g: counts[:, i] for i, g in enumerate(gates)})
    for key in _SCALARS:
        if events and key in events[0]["data"]:
            cols[key] = np.array([float(e["data"][key]) for e in events])
    if "lock_minus_frequency" in cols:
        cols["lock_f_minus"] = _signed_f_minus(cols, events)
    return cols


def _signed_f_minus(cols: Mapping[str, np.ndarray], events: Sequence[Mapping[str, Any]]
                    ) -> np.ndarray:
    """The ms=0->-1 frequencies signed as ``physics.nv_transition_frequencies`` gives them
    (negative above the level anticrossing), by continuity of B_par along the lock's path,
    the events' order (``physics.minus_transition_signs``)."""
    fp, fm = cols["lock_frequency"], cols["lock_minus_frequency"]
    order = np.argsort([e.get("seq_num", i) for i, e in enumerate(events)], kind="stable")
    signs = np.empty_like(fp)
    signs[order] = physics.minus_transition_signs(fp[order], fm[order])
    return signs * np.abs(fm)


def _raster(start: Mapping[str, Any], events: Sequence[Mapping[str, Any]],
            attrs: dict[str, Any]) -> xr.Dataset:
    grid = start["grid"]
    shape = [int(n) for n in grid["shape"]]                 # z, y, x
    names = [a.split("_")[-1] for a in grid["axes"]]
    coords = {n: np.linspace(lo, hi, num) for n, (lo, hi), num
              in zip(names, grid["extents"], shape, strict=True)}
    index = []
    for e in events:
        idx = []
        for n, (lo, hi), num in zip(names, grid["extents"], shape, strict=True):
            d = e["data"]
            pos = d.get(f"stage_{n}_user_setpoint", d.get(f"stage_{n}"))
            i = 0 if num == 1 or hi == lo else int(round((pos - lo) / (hi - lo) * (num - 1)))
            idx.append(min(max(i, 0), num - 1))
        index.append(tuple(idx))
    data_vars = {}
    for key, values in _columns(events, _gates(start)).items():
        arr = np.full(shape, np.nan)
        for idx, v in zip(index, values, strict=True):
            arr[idx] = v
        data_vars[key] = (names, arr)
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    for n in names:
        ds[n].attrs["units"] = "nm"
    total = int(np.prod(shape))
    ds.attrs.update(points_measured=len(set(index)), points_planned=total,
                    complete=len(set(index)) == total)
    return ds.transpose("x", "y", "z")


def _points(start: Mapping[str, Any], events: Sequence[Mapping[str, Any]],
            attrs: dict[str, Any]) -> xr.Dataset:
    """A list of points: counts along ``point``, coords ``x``, ``y``, ``z`` (nm) from the
    stage setpoints of each event, ``shots`` per point from the pulser's reading."""
    cols = _columns(events, _gates(start))
    coords: dict[str, Any] = {"point": np.arange(len(events))}
    for n in ("x", "y", "z"):
        coords[n] = ("point", np.array(
            [float(e["data"].get(f"stage_{n}_user_setpoint", e["data"].get(f"stage_{n}")))
             for e in events]), {"units": "nm"})
    data = {k: ("point", v) for k, v in cols.items()}
    if events and "pulser_shots" in events[0]["data"]:
        data["shots"] = ("point", np.array([float(e["data"]["pulser_shots"]) for e in events]))
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    planned = start.get("num_points")
    ds.attrs.update(points_measured=len(events), points_planned=planned or len(events),
                    complete=planned in (None, len(events)))
    return ds


def _sweep(start: Mapping[str, Any], events: Sequence[Mapping[str, Any]],
           attrs: dict[str, Any]) -> xr.Dataset:
    coord, unit = SWEEP_COORDS.get(start.get("plan_name", ""), (None, None))
    cols = _columns(events, _gates(start))
    if coord is None:
        values = np.arange(len(events), dtype=float)
        coord, unit = "point", ""
    else:
        key = coord if events and coord in events[0]["data"] else None
        if key is None:
            raise NvmriError(f"run {attrs['uid'][:8]} has no {coord!r} readings")
        values = np.array([float(e["data"][key]) for e in events])
    ds = xr.Dataset({k: (coord, v) for k, v in cols.items()}, coords={coord: values},
                    attrs=attrs)
    ds[coord].attrs["units"] = unit
    planned = start.get("num_points")
    ds.attrs.update(points_measured=len(events), points_planned=planned or len(events),
                    complete=planned in (None, len(events)))
    return ds


def run_dataset(start: Mapping[str, Any], events: Iterable[Mapping[str, Any]],
                stop: Mapping[str, Any] | None = None) -> xr.Dataset:
    """A run's primary-stream events as an ``xarray.Dataset``.

    Parameters
    ----------
    start : mapping
        The run's start document.
    events : iterable of mapping
        Its primary-stream event documents.
    stop : mapping, optional
        Its stop document (exit status into ``attrs``).

    Returns
    -------
    xarray.Dataset
        Rasters on the grid (dims ``x``, ``y``, ``z``, nm); point runs
        (:data:`POINT_PLANS`) along ``point`` with ``x``, ``y``, ``z`` coordinates and
        per-point ``shots``; sweeps on the swept coordinate.  Gate counts by
        gate name (``signal``, ``echo``, ``bright``, ``dark``, ``lock_0`` ...),
        ``lock_frequency`` etc. in Hz; ``attrs`` carry the plan's timing and
        frequency arguments in SI units.
    """
    events = list(events)
    attrs = _attrs(start, stop)
    if start.get("plan_name") in RASTER_PLANS and "grid" in start:
        return _raster(start, events, attrs)
    if start.get("plan_name") in POINT_PLANS:
        return _points(start, events, attrs)
    return _sweep(start, events, attrs)


def load_run(catalog: Any, uid: str, plans: Sequence[str] | None = None) -> xr.Dataset:
    """Read a run back from a catalog and convert it with :func:`run_dataset`.

    Parameters
    ----------
    catalog
        An open :class:`nvmri_bluesky.catalog.Catalog`.
    uid : str
        Run uid or unique prefix.
    plans : sequence of str, optional
        Plan names the caller accepts; another plan is a one-line error.
    """
    start, stop, events, primary = None, None, [], None
    for name, doc in catalog.documents(uid):
        if name == "start":
            start = doc
        elif name == "descriptor" and doc.get("name") == "primary":
            primary = doc["uid"]
        elif name == "event" and doc.get("descriptor") == primary:
            events.append(doc)
        elif name == "event_page" and doc.get("descriptor") == primary:
            events.extend(unpack_event_page(doc))
        elif name == "stop":
            stop = doc
    if start is None:
        raise NvmriError(f"run {uid} has no start document")
    if plans is not None and start.get("plan_name") not in plans:
        raise NvmriError(f"run {uid[:8]} is a {start.get('plan_name')!r} run; expected "
                         f"{' or '.join(plans)}")
    return run_dataset(start, events, stop)

