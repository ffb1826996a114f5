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

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from ophyd import EpicsSignal, EpicsSignalRO
from ophyd.signal import DEFAULT_WRITE_TIMEOUT, UNSET_VALUE
from ophyd.status import Status
from ophyd.utils import LimitError

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.timeouts import timeout_s


class LimitExceeded(NvmriError, LimitError):
    """A setpoint outside the IOC's limits, refused before anything was sent."""

__all__ = ["LimitExceeded", "UnitsMixin", "EpicsSignalU", "EpicsSignalROU", "WaveformSignalRO",
           "SetpointWithReadback", "VerifiedSetpoint", "ConciseRepr", "call_later", "fill_units",
           "lost_connection", "put_flush_only", "watch_disconnect"]

logger = logging.getLogger(__name__)


class _Deadlines:
    """Run callbacks at deadlines on one daemon thread.

    The devices arm a watchdog (a readback or counts that should have arrived
    by now) on every put; a ``threading.Timer`` would start a thread per put
    (about 0.1-0.7 ms, on the thread that completes the status).  Entries are
    cancelled lazily: the callback is dropped, the entry expires unnoticed.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> list[Any]:
        entry = [time.monotonic() + delay, next(self._seq), fn]
        with self._cv:
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="nvmri-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cv.notify()
        return entry

    def _next(self) -> Callable[[], None]:
        with self._cv:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay <= 0:
                    fn = heapq.heappop(self._heap)[2]
                    if fn is not None:
                        return fn
                    continue
                self._cv.wait(delay)

    def _run(self) -> None:
        while True:
            fn = self._next()
            try:
                fn()
            except Exception:  # noqa: BLE001 - a watchdog must not die
                logger.exception("deadline callback %r failed", fn)


_deadlines = _Deadlines()


def call_later(delay: float, fn: Callable[[], None]) -> Callable[[], None]:
    """Call ``fn()`` on the shared watchdog thread after ``delay`` s; return a cancel function."""
    entry = _deadlines.call_later(delay, fn)

    def cancel() -> None:
        entry[2] = None

    return cancel


_flush = threading.local()


def _install_put_flush() -> bool:
    """Let :func:`put_flush_only` change how pyepics ends a put (pyepics control layer only).

    ``epics.ca.put`` queues the request and then calls ``ca.poll()``, i.e.
    ``ca_pend_event(1e-4 s)`` (1e-5 s without a callback) and ``ca_pend_io``:
    with preemptive callbacks that is a flush plus a sleep, 0.1-0.7 ms on the
    calling thread (the RunEngine's) per put on a loaded machine.  The
    replacement only flushes (``ca_flush_io``), and only on a thread inside
    :func:`put_flush_only`; everywhere else ``ca.poll`` is unchanged.
    """
    try:
        import ophyd
        if getattr(ophyd.cl, "name", "") != "pyepics":
            return False
        from epics import ca
    except Exception:  # noqa: BLE001 - another control layer: nothing to do
        return False
    if getattr(ca.poll, "_nvmri_flush", False):
        return True
    original = ca.poll

    def poll(evt: float = 1.0e-5, iot: float = 1.0) -> Any:
        if getattr(_flush, "only", False):
            return ca.flush_io()
        return original(evt=evt, iot=iot)

    poll._nvmri_flush = True  # type: ignore[attr-defined]
    poll.__doc__ = original.__doc__
    ca.poll = poll
    return True


_PUT_FLUSH = _install_put_flush()


@contextlib.contextmanager
def put_flush_only() -> Iterator[None]:
    """Within this block, a pyepics put on this thread is flushed, not followed by a sleep.

    The put itself (and its put-completion callback) is unchanged; see
    :func:`_install_put_flush`.
    """
    if not _PUT_FLUSH or getattr(_flush, "only", False):
        yield
        return
    _flush.only = True
    try:
        yield
    finally:
        _flush.only = False


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


def watch_disconnect(signal: Any, status: Any, what: str) -> None:
    """Fail ``status`` with :class:`NvmriError` if ``signal`` disconnects before it is done.

    Without this a put-completion or a motor move whose IOC dies never
    completes; with it the plan gets one clear line at once.
    """
    cid = _watch_disconnect(signal, status, what)
    status.add_callback(lambda _st: signal.unsubscribe(cid))


def lost_connection(pvname: str, what: str) -> NvmriError:
    """The one-line error of a PV whose IOC went away during ``what``."""
    return NvmriError(f"lost the connection to {pvname} during {what} "
                      "(IOC stopped or unreachable)")


def _put_checked(signal: Any, status: Any, what: str, value: Any, **kwargs: Any) -> None:
    """``signal.put(value, **kwargs)``; a failure fails ``status`` too and is raised.

    A PV that is already disconnected when the put starts makes ophyd wait
    for it and raise ``TimeoutError``; that becomes :func:`lost_connection`,
    the same line as a disconnect seen while the put is pending.
    """
    try:
        signal.put(value, **kwargs)
    except Exception as exc:
        error = (lost_connection(signal.pvname, what)
                 if isinstance(exc, TimeoutError) and not signal.connected else exc)
        if not status.done:
            status.set_exception(error)
        if error is exc:
            raise
        raise error from exc


def _watch_disconnect(signal: Any, status: Any, what: str) -> int:
    """:func:`watch_disconnect` without the clean-up: return the subscription id."""
    def on_meta(*, connected: bool = True, **_: Any) -> None:
        if not connected and not status.done:
            try:
                status.set_exception(lost_connection(signal.pvname, what))
            except Exception:  # noqa: BLE001 - finished meanwhile: nothing to fail
                pass

    return signal.subscribe(on_meta, event_type=signal.SUB_META, run=False)


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

        _put_checked(self, status, f"the put to {self.setpoint_pvname}", value,
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
                _watch_disconnect(self, status, f"the put to {self.setpoint_pvname}"))

        def cleanup(_st: Any) -> None:
            for cid in cids:
                self.unsubscribe(cid)

        status.add_callback(cleanup)
        on_readback(value=self._readback)   # already there (setting the same value)
        with put_flush_only():
            _put_checked(self, status, f"the put to {self.setpoint_pvname}", value,
                         use_complete=True, callback=on_put)
        return status
