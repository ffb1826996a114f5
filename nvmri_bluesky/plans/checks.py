"""Argument checks that run before a plan opens its run or moves anything.

Each raises :class:`~nvmri_bluesky.errors.NvmriError` with one line naming the
argument, its value and the rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nvmri_bluesky.errors import NvmriError

Axis = tuple[float, float, int]
"""A raster axis: (start, stop, num), nm."""


def check_positive(**values: float) -> None:
    """Every value must be a finite number > 0."""
    for name, value in values.items():
        if not (np.isfinite(value) and value > 0):
            raise NvmriError(f"{name} must be > 0, got {value!r}")


def check_values_positive(name: str, values: Sequence[float]) -> None:
    """A sweep's values must be non-empty, finite and > 0."""
    arr = np.asarray(values, float)
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        bad = arr[~(np.isfinite(arr) & (arr > 0))] if arr.size else "none"
        raise NvmriError(f"{name} must all be > 0 (got {bad!r})")


def _limits(signal: Any) -> tuple[float, float]:
    try:
        lo, hi = signal.limits
    except Exception:  # noqa: BLE001 - a signal without limits has none
        return (-np.inf, np.inf)
    return (lo, hi) if hi > lo else (-np.inf, np.inf)


def check_frequency(source: Any, frequency_hz: float, name: str) -> None:
    """The frequency must lie inside the source's range (its EPICS drive limits)."""
    lo, hi = _limits(source.frequency)
    if not (np.isfinite(frequency_hz) and lo <= frequency_hz <= hi):
        raise NvmriError(f"{name} = {frequency_hz / 1e9:.6g} GHz is outside the "
                         f"{source.name} range {lo / 1e9:.6g}..{hi / 1e9:.6g} GHz")


def check_setting(signal: Any, value: float, name: str, unit: str) -> None:
    """``value`` must be finite and inside ``signal``'s range (its PV's control limits).

    For settings the IOC bounds, e.g. a motor's ``.LLM`` (the stage travel):
    the plan refuses before anything is put.
    """
    lo, hi = _limits(signal)
    if not (np.isfinite(value) and lo <= value <= hi):
        raise NvmriError(f"{name} = {value!r} {unit} is outside the range {lo:g}..{hi:g} {unit} "
                         f"of {getattr(signal, 'name', signal)}; nothing was set")


def check_axis(name: str, axis: Axis) -> Axis:
    """(start, stop, num) with num >= 1 and a non-zero step when num > 1."""
    try:
        start, stop, num = float(axis[0]), float(axis[1]), int(axis[2])
    except (TypeError, ValueError, IndexError) as err:
        raise NvmriError(f"{name} must be (start_nm, stop_nm, num), got {axis!r}") from err
    if num < 1:
        raise NvmriError(f"{name}: num must be >= 1, got {num}")
    if num > 1 and start == stop:
        raise NvmriError(f"{name}: zero step (start = stop = {start} nm with num = {num})")
    return start, stop, num


def check_grid(stage: Any, axes: dict[str, Axis]) -> dict[str, Axis]:
    """Every raster axis inside its motor's soft limits; z never below z_min.

    Parameters
    ----------
    stage
        Stage device with motors ``x``, ``y``, ``z``.
    axes : dict
        Motor attribute name -> (start, stop, num), nm.
    """
    checked = {}
    for motor_name, axis in axes.items():
        start, stop, num = check_axis(motor_name, axis)
        motor = getattr(stage, motor_name)
        lo, hi = _limits(motor)
        for end in (start, stop):
            if not lo <= end <= hi:
                what = "below z_min" if motor_name == "z" and end < lo else "outside the limits"
                raise NvmriError(f"{motor_name} = {end:g} nm is {what} of {motor.name} "
                                 f"({lo:g}..{hi:g} nm); nothing moved")
        checked[motor_name] = (start, stop, num)
    return checked
