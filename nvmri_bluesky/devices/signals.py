"""Signals shared by the devices: units in every data key, waveforms, concise reprs.

* :class:`EpicsSignalU` / :class:`EpicsSignalROU`: ``EpicsSignal`` /
  ``EpicsSignalRO`` whose ``describe()`` always carries ``units`` (the IOC's
  EGU when it gives one, else the unit declared on the component).
* :class:`WaveformSignalRO`: a waveform PV read as an array with named dims.
* :class:`ConciseRepr`: ``repr()`` of a device without its attribute lists.

Readback-checked setpoints: :mod:`.setpoints`; Channel Access plumbing
(watchdogs, flush-only puts, disconnects): :mod:`.ca_plumbing`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ophyd import EpicsSignal, EpicsSignalRO
from ophyd.signal import UNSET_VALUE

__all__ = ["UnitsMixin", "EpicsSignalU", "EpicsSignalROU", "WaveformSignalRO", "ConciseRepr",
           "fill_units"]


class ConciseRepr:
    """Mixin for devices: ``repr()`` names the device without its attribute lists.

    bluesky puts ``repr(msg.obj)`` on the trace span of every ``set`` and
    ``trigger`` and ophyd on every status; ophyd's device repr walks every
    component for ``read_attrs`` and ``configuration_attrs`` (0.2-0.3 ms
    for a motor record here).
    """

    def __repr__(self) -> str:
        parent = getattr(self, "parent", None)
        of = f", parent={parent.name!r}" if parent is not None else ""
        return f"{type(self).__name__}(prefix={self.prefix!r}, name={self.name!r}{of})"


def fill_units(described: dict[str, dict[str, Any]], default: str) -> dict[str, dict[str, Any]]:
    """Give every data key without (or with empty) ``units`` the unit ``default``."""
    for desc in described.values():
        if not desc.get("units"):
            desc["units"] = default
    return described


class UnitsMixin:
    """Mixin for ophyd EPICS signals: ``units=`` names the unit when the IOC has no EGU."""

    def __init__(self, *args: Any, units: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.default_units = units

    def describe(self) -> dict[str, dict[str, Any]]:
        """ophyd's description with ``units`` always present."""
        return fill_units(super().describe(), self.default_units)  # type: ignore[misc]


class EpicsSignalU(UnitsMixin, EpicsSignal):
    """Read/write EPICS signal whose data key always has ``units``."""


class EpicsSignalROU(UnitsMixin, EpicsSignalRO):
    """Read-only EPICS signal whose data key always has ``units``."""


class WaveformSignalRO(EpicsSignalROU):
    """A numeric waveform that is always a 1-D float array, even with one element.

    pyepics hands a one-element waveform over as a scalar; a per-gate counts
    waveform must stay an array of shape (n_gates,) whatever n_gates is.

    Parameters
    ----------
    dims : sequence of str
        Name of the array's dimension in the data key (``dims``).
    """

    def __init__(self, *args: Any, dims: tuple[str, ...] = ("gate",), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dims = tuple(dims)

    @staticmethod
    def _as_array(value: Any) -> Any:
        if value is None or value is UNSET_VALUE:
            return value
        return np.atleast_1d(np.asarray(value, dtype=float))

    def _read_changed(self, value: Any = None, **kwargs: Any) -> None:
        super()._read_changed(value=self._as_array(value), **kwargs)

    def get(self, **kwargs: Any) -> Any:
        """The waveform as a 1-D float array."""
        return self._as_array(super().get(**kwargs))

    def describe(self) -> dict[str, dict[str, Any]]:
        """Array data key: dtype ``array``, shape (n,), ``dims``, units."""
        described = super().describe()
        desc = described[self.name]
        value = self._readback if self._readback is not UNSET_VALUE else self.get()
        desc.update(dtype="array", dtype_numpy=np.dtype(float).str,
                    shape=[int(np.size(value))], dims=list(self.dims))
        return described
