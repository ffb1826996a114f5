"""Signals shared by the devices: units in every data key, readback-checked setpoints.

* :class:`EpicsSignalU` / :class:`EpicsSignalROU`: ``EpicsSignal`` /
  ``EpicsSignalRO`` whose ``describe()`` always carries ``units`` (the IOC's
  EGU when it gives one, else the unit declared on the component).
* :class:`SetpointWithReadback`: a setpoint PV with its ``_RBV`` readback, as
  signal-generator IOCs have.  ``set()`` completes when the IOC has completed
  the put *and* the monitored readback shows the value, so the next
  ``read()`` (served from the monitor cache, no CA round trip) is the new
  value; it fails with one clear line if the readback never gets there.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from ophyd import EpicsSignal, EpicsSignalRO
from ophyd.signal import DEFAULT_WRITE_TIMEOUT, UNSET_VALUE
from ophyd.status import Status
from ophyd.utils import LimitError

from nvmri_bluesky.errors import NvmriError


class LimitExceeded(NvmriError, LimitError):
    """A setpoint outside the IOC's limits, refused before anything was sent."""

__all__ = ["LimitExceeded", "UnitsMixin", "EpicsSignalU", "EpicsSignalROU", "WaveformSignalRO",
           "SetpointWithReadback", "fill_units", "watch_disconnect"]


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


def watch_disconnect(signal: Any, status: Any, what: str) -> None:
    """Fail ``status`` with :class:`NvmriError` if ``signal`` disconnects before it is done.

    Without this a put-completion or a motor move whose IOC dies never
    completes; with it the plan gets one clear line at once.
    """
    def on_meta(*, connected: bool = True, **_: Any) -> None:
        if not connected and not status.done:
            try:
                status.set_exception(NvmriError(
                    f"lost the connection to {signal.pvname} during {what} "
                    "(IOC stopped or unreachable)"))
            except Exception:  # noqa: BLE001 - finished meanwhile: nothing to fail
                pass

    cid = signal.subscribe(on_meta, event_type=signal.SUB_META, run=False)
    status.add_callback(lambda _st: signal.unsubscribe(cid))


class SetpointWithReadback(EpicsSignalU):
    """Setpoint PV ``write_pv`` with readback ``read_pv``; ``set()`` waits for both.

    Parameters
    ----------
    read_pv : str
        The readback PV (``..._RBV``); what ``read()`` returns.
    write_pv : str
        The setpoint PV, written with put-completion.
    units : str
        Unit of the data key when the IOC gives no EGU.
    tolerance, rtolerance : float, optional
        |readback - setpoint| <= tolerance + rtolerance |setpoint| counts as
        reached; exact equality when both are None.
    readback_timeout : float
        How long after the IOC completed the put the readback may take to
        arrive, s.
    """

    def __init__(self, read_pv: str, write_pv: str | None = None, *, units: str = "",
                 readback_timeout: float = 2.0, **kwargs: Any):
        kwargs.setdefault("auto_monitor", True)
        kwargs["put_complete"] = True
        super().__init__(read_pv, write_pv=write_pv, units=units, **kwargs)
        self.readback_timeout = readback_timeout

    def check_value(self, value: Any) -> None:
        """Refuse values outside the setpoint PV's control limits (when it has any)."""
        try:
            super().check_value(value)
        except LimitError as exc:
            low, high = self.limits
            raise LimitExceeded(f"{self.name}: {value!r} {self.default_units} is outside "
                                f"{low:g}..{high:g} {self.default_units}; not set") from exc

    def _target(self, value: Any) -> Any:
        """``value`` as the readback will show it (enum strings -> index)."""
        enums = self.enum_strs
        if isinstance(value, str) and enums and not self._string:
            try:
                return list(enums).index(value)
            except ValueError:
                raise NvmriError(f"{self.name}: {value!r} is not one of {list(enums)}") from None
        return value

    def _reached(self, readback: Any, target: Any) -> bool:
        if readback is None or readback is UNSET_VALUE:
            return False
        if isinstance(target, str) or isinstance(readback, str):
            return str(readback) == str(target)
        atol = self.tolerance or 0.0
        rtol = self.rtolerance or 0.0
        try:
            rb, tg = np.asarray(readback, float), np.asarray(target, float)
        except (TypeError, ValueError):
            return False
        return bool(np.all(np.abs(rb - tg) <= atol + rtol * np.abs(tg)))

    def set(self, value: Any, *, timeout: float | None = DEFAULT_WRITE_TIMEOUT,
            settle_time: float | None = None) -> Status:
        """Put ``value`` with completion; done when the readback shows it.

        Returns
        -------
        Status
            Fails with :class:`NvmriError` if the readback has not reached the
            value ``readback_timeout`` s after the IOC completed the put, or if
            the connection drops.
        """
        if timeout is DEFAULT_WRITE_TIMEOUT:
            timeout = self.write_timeout
        target = self._target(value)
        status = Status(self, timeout=timeout, settle_time=settle_time)
        lock = threading.Lock()
        state = {"put": False, "readback": False}
        timer: list[threading.Timer] = []

        def finish() -> None:
            with lock:
                if not (state["put"] and state["readback"]) or status.done:
                    return
                for t in timer:
                    t.cancel()
                status.set_finished()

        def on_readback(*, value: Any = None, **_: Any) -> None:
            if self._reached(value, target):
                state["readback"] = True
                finish()

        def too_late() -> None:
            with lock:
                if status.done:
                    return
                status.set_exception(NvmriError(
                    f"{self.name}: the IOC did not apply {value!r} {self.default_units}: the "
                    f"readback {self.pvname} still shows {self._readback!r} "
                    f"{self.readback_timeout:g} s after the put (refused?)"))

        def on_put(**_: Any) -> None:
            state["put"] = True
            if not state["readback"]:
                t = threading.Timer(self.readback_timeout, too_late)
                t.daemon = True
                timer.append(t)
                t.start()
            finish()

        cid = self.subscribe(on_readback, event_type=self.SUB_VALUE, run=False)
        status.add_callback(lambda _st: self.unsubscribe(cid))
        watch_disconnect(self, status, f"the put to {self.setpoint_pvname}")
        on_readback(value=self._readback)   # already there (setting the same value)
        try:
            self.put(value, use_complete=True, callback=on_put)
        except Exception as exc:
            status.set_exception(exc)
            raise
        return status
