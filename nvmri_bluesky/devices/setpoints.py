"""Readback-checked setpoints: a ``set()`` is applied or fails loudly.

:class:`SetpointWithReadback`: a setpoint PV with its ``_RBV`` readback, as
signal-generator IOCs have.  ``set()`` completes when the IOC has completed
the put *and* the monitored readback shows the value, so the next
``read()`` (served from the monitor cache, no CA round trip) is the new
value; it fails with one clear line if the readback never gets there.

:class:`VerifiedSetpoint`: a setting PV without a readback PV, whose ``set()``
puts with completion and then reads the PV back (done or failed with the
IOC's reason).
Values outside the IOC's limits raise :class:`LimitExceeded` before any put.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from ophyd.signal import DEFAULT_WRITE_TIMEOUT, UNSET_VALUE
from ophyd.status import Status
from ophyd.utils import LimitError

from nvmri_bluesky.devices.ca_plumbing import (
    call_later,
    put_checked,
    put_flush_only,
    subscribe_disconnect,
    watch_disconnect,
)
from nvmri_bluesky.devices.signals import EpicsSignalU
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.timeouts import timeout_s

__all__ = ["LimitExceeded", "VerifiedSetpoint", "SetpointWithReadback"]


class LimitExceeded(NvmriError, LimitError):
    """A setpoint outside the IOC's limits, refused before anything was sent."""


_REFUSAL_GRACE_S = 0.2
"""After a completed put whose value is not there yet, how long before asking the IOC, s."""


def _reached(readback: Any, target: Any, atol: float = 0.0, rtol: float = 0.0) -> bool:
    """True if ``readback`` shows ``target`` (strings exactly, numbers within the tolerances)."""
    if readback is None or readback is UNSET_VALUE:
        return False
    if isinstance(target, str) or isinstance(readback, str):
        return str(readback) == str(target)
    if isinstance(readback, int | float | np.number) and isinstance(target, int | float):
        return abs(float(readback) - target) <= atol + rtol * abs(target)
    try:
        rb, tg = np.asarray(readback, float), np.asarray(target, float)
    except (TypeError, ValueError):
        return False
    return bool(np.all(np.abs(rb - tg) <= atol + rtol * np.abs(tg)))


class _CheckedSetting(EpicsSignalU):
    """A setting whose ``set()`` is applied or fails loudly.

    Values outside the PV's control limits, and numbers that are not finite,
    raise :class:`LimitExceeded` before anything is sent.  Subclasses define
    what "applied" means; :meth:`_refusal` names why the IOC refused.
    """

    def __init__(self, *args: Any, units: str = "", reason_attr: str | None = None,
                 **kwargs: Any):
        kwargs["put_complete"] = True
        super().__init__(*args, units=units, **kwargs)
        self.reason_attr = reason_attr

    def check_value(self, value: Any) -> None:
        """Refuse values outside the setpoint PV's control limits, and non-finite numbers."""
        if isinstance(value, float | np.floating) and not np.isfinite(value):
            raise LimitExceeded(f"{self.name}: {value!r} is not a finite number; not set")
        try:
            super().check_value(value)
        except LimitError as exc:
            low, high = self.limits
            raise LimitExceeded(f"{self.name}: {value!r} {self.default_units} is outside "
                                f"{low:g}..{high:g} {self.default_units}; not set") from exc

    def _refusal(self, value: Any, now: Any) -> NvmriError:
        """The error of a put of ``value`` that the IOC did not apply (``now`` is what it shows)."""
        why = ""
        if self.reason_attr and self.parent is not None:
            try:
                why = str(getattr(self.parent, self.reason_attr).get(use_monitor=False))
            except Exception:  # noqa: BLE001 - no reason readable: say what we know
                why = ""
        unit = f" {self.default_units}" if self.default_units else ""
        return NvmriError(f"{self.name}: the IOC refused {value!r}{unit}"
                          f"{': ' + why if why else ''} ({self.setpoint_pvname} still reads "
                          f"{now!r}{unit})")

    def _fresh_setpoint(self) -> Any:
        """The setpoint PV's value now (a CA get, not the monitor cache)."""
        return self.get_setpoint(use_monitor=False)


class VerifiedSetpoint(_CheckedSetting):
    """A setting PV without a readback PV (``PG:SHOTS``, a motor's ``.LLM``).

    ``set()`` puts with completion, then reads the PV back with a fresh CA
    get: done if it shows the value, failed with the IOC's reason (the
    parent's ``reason_attr`` signal, e.g. ``PG:MESSAGE``) if not.  Nothing is
    left pending: every put ends in done or failed.

    Parameters
    ----------
    reason_attr : str, optional
        Attribute of the parent device whose value says why a put was refused.
    """

    def set(self, value: Any, *, timeout: float | None = DEFAULT_WRITE_TIMEOUT,
            settle_time: float | None = None) -> Status:
        """Put ``value`` with completion; done when a fresh read shows it, else failed.

        Returns
        -------
        Status
            Fails with :class:`NvmriError` naming the IOC's reason if the value
            was not applied, or if the connection drops.
        """
        if timeout is DEFAULT_WRITE_TIMEOUT:
            timeout = self.write_timeout
        status = Status(self, timeout=timeout, settle_time=settle_time)
        watch_disconnect(self, status, f"the put to {self.setpoint_pvname}")

        def verdict() -> None:
            try:
                now = self._fresh_setpoint()
                error = None if _reached(now, value) else self._refusal(value, now)
            except Exception as exc:  # noqa: BLE001 - any CA failure fails the status
                error = NvmriError(f"{self.name}: cannot read {self.setpoint_pvname} back: {exc}")
            if status.done:
                return
            if error is None:
                status.set_finished()
            else:
                status.set_exception(error)

        def on_put(**_: Any) -> None:
            # a CA get must not run on the put-callback thread
            threading.Thread(target=verdict, name=f"{self.name}-verdict", daemon=True).start()

        put_checked(self, status, f"the put to {self.setpoint_pvname}", value,
                    use_complete=True, callback=on_put)
        return status


class SetpointWithReadback(_CheckedSetting):
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
    readback_timeout : float, optional
        How long after the IOC completed the put the readback may take to
        arrive, s (default a fifth of :func:`~nvmri_bluesky.timeouts.timeout_s`).
        If the setpoint PV itself does not show the value shortly after the
        put completed, the IOC refused it and the status fails at once.
    """

    def __init__(self, read_pv: str, write_pv: str | None = None, *, units: str = "",
                 readback_timeout: float | None = None, **kwargs: Any):
        kwargs.setdefault("auto_monitor", True)
        super().__init__(read_pv, write_pv=write_pv, units=units, **kwargs)
        self.readback_timeout = (timeout_s(0.2) if readback_timeout is None
                                 else readback_timeout)

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
        return _reached(readback, target, self.tolerance or 0.0, self.rtolerance or 0.0)

    def set(self, value: Any, *, timeout: float | None = DEFAULT_WRITE_TIMEOUT,
            settle_time: float | None = None) -> Status:
        """Put ``value`` with completion; done when the readback shows it.

        Returns
        -------
        Status
            Fails with :class:`NvmriError` if the IOC refused the value (the
            setpoint PV does not show it once the put completed), if the
            readback has not reached it ``readback_timeout`` s after the put,
            or if the connection drops.
        """
        if timeout is DEFAULT_WRITE_TIMEOUT:
            timeout = self.write_timeout
        target = self._target(value)
        status = Status(self, timeout=timeout, settle_time=settle_time)
        lock = threading.Lock()
        state = {"put": False, "readback": False}
        cancels: list[Callable[[], None]] = []

        def finish() -> None:
            with lock:
                if not (state["put"] and state["readback"]) or status.done:
                    return
                for cancel in cancels:
                    cancel()
                status.set_finished()

        def fail(error: NvmriError) -> None:
            with lock:
                if not status.done:
                    status.set_exception(error)

        def on_readback(*, value: Any = None, **_: Any) -> None:
            if self._reached(value, target):
                state["readback"] = True
                finish()

        def too_late() -> None:
            fail(NvmriError(
                f"{self.name}: the IOC did not apply {value!r} {self.default_units}: the "
                f"readback {self.pvname} still shows {self._readback!r} "
                f"{self.readback_timeout:g} s after the put (refused?)"))

        def refused() -> None:
            # the put completed without the readback: does the setpoint show the value?
            try:
                now = self._fresh_setpoint()
            except Exception:  # noqa: BLE001 - unreadable: let the readback timer decide
                return
            if not self._reached(now, target) and not status.done:
                fail(self._refusal(value, now))

        def on_put(**_: Any) -> None:
            state["put"] = True
            if not state["readback"]:
                cancels.append(call_later(self.readback_timeout, too_late))
                cancels.append(call_later(_REFUSAL_GRACE_S, lambda: threading.Thread(
                    target=refused, name=f"{self.name}-refused", daemon=True).start()))
            finish()

        cids = (self.subscribe(on_readback, event_type=self.SUB_VALUE, run=False),
                subscribe_disconnect(self, status, f"the put to {self.setpoint_pvname}"))

        def cleanup(_st: Any) -> None:
            for cid in cids:
                self.unsubscribe(cid)

        status.add_callback(cleanup)
        on_readback(value=self._readback)   # already there (setting the same value)
        with put_flush_only():
            put_checked(self, status, f"the put to {self.setpoint_pvname}", value,
                        use_complete=True, callback=on_put)
        return status
