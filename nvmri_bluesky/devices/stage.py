"""The tip stage: three EPICS motor records (X, Y, Z) in nm.

``Stage(prefix + "STAGE:", name="stage")`` gives data keys ``stage_x``,
``stage_y``, ``stage_z`` (readbacks, hinted) and ``stage_*_user_setpoint``.
A move outside a motor's soft limits (``.LLM``/``.HLM``; Z's low limit is the
z_min crash guard) raises :class:`StageLimitError` before anything is sent,
so nothing moves.  A move whose IOC disconnects fails at once instead of
hanging.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, EpicsMotor, EpicsSignal
from ophyd.device import required_for_connection
from ophyd.utils import DisconnectedError
from ophyd.utils.epics_pvs import AlarmSeverity

from nvmri_bluesky.devices.ca_plumbing import call_later, put_flush_only, watch_disconnect
from nvmri_bluesky.devices.setpoints import LimitExceeded, VerifiedSetpoint
from nvmri_bluesky.devices.signals import ConciseRepr, EpicsSignalROU
from nvmri_bluesky.errors import NvmriError

__all__ = ["StageLimitError", "NmMotor", "Stage"]


_REFUSED_GRACE_S = 0.2
"""After a move's put completed without the move, how long before asking the IOC, s."""


class StageLimitError(LimitExceeded):
    """A stage move outside the soft limits (z below z_min among them); nothing moved."""


class _MoveSetpoint(EpicsSignal):
    """``.VAL``: a move's put asks for completion, which the motor record gives when the
    move has ended, or at once when it refused the move (then the move fails)."""

    def put(self, value: Any, *args: Any, wait: bool = False, callback: Any = None,
            use_complete: bool | None = None, **kwargs: Any) -> None:
        """``EpicsSignal.put``; a plain put (a move) reports its completion to the motor."""
        if callback is None and not wait and isinstance(self.parent, NmMotor):
            parent = self.parent

            def callback(**_: Any) -> None:
                parent._move_put_done(value)

            use_complete = True
        super().put(value, *args, wait=wait, callback=callback, use_complete=use_complete,
                    **kwargs)


class NmMotor(ConciseRepr, EpicsMotor):
    """``EpicsMotor`` in nm whose soft limits are the record's ``.LLM`` / ``.HLM``.

    The limits come from the monitored ``.LLM`` / ``.HLM`` fields (as the
    motor record enforces them), not from the ``.VAL`` control limits, and
    :meth:`check_value` names the crash guard in its message.
    """

    # MOVN unmonitored: nothing reads it from the monitor (ophyd's ``moving``
    # makes a CA get) and every move posts it twice
    motor_is_moving = Cpt(EpicsSignalROU, ".MOVN", kind="omitted", auto_monitor=False,
                          units="")
    user_setpoint = Cpt(_MoveSetpoint, ".VAL", limits=True, auto_monitor=True)
    # soft limits: a put the IOC refuses fails the set() (ophyd's EpicsSignal would
    # wait for ever); values outside the travel (the fields' control limits) are
    # refused before the put
    low_limit_travel = Cpt(VerifiedSetpoint, ".LLM", kind="omitted", auto_monitor=True,
                           limits=True, units="nm")
    high_limit_travel = Cpt(VerifiedSetpoint, ".HLM", kind="omitted", auto_monitor=True,
                            limits=True, units="nm")

    UNITS: dict[str, str] = {
        "user_readback": "nm", "user_setpoint": "nm", "user_offset": "nm",
        "velocity": "nm/s", "acceleration": "s",
    }
    """Units of the data keys when the IOC gives no EGU (``""`` for the rest)."""

    @property
    def limits(self) -> tuple[float, float]:
        """(low, high) soft limits, nm; (0, 0) means none (motor-record convention)."""
        return (float(self.low_limit_travel.get()), float(self.high_limit_travel.get()))

    def check_value(self, pos: Any) -> None:
        """Raise :class:`StageLimitError` unless ``pos`` is a finite position within limits."""
        try:
            value = float(pos)
        except (TypeError, ValueError):
            raise StageLimitError(f"{self.name}: position must be a number in nm, "
                                  f"got {pos!r}; nothing moved") from None
        if not math.isfinite(value):
            raise StageLimitError(f"{self.name}: position {pos!r} is not finite; nothing moved")
        low, high = self.limits
        if low < high and not low <= value <= high:
            if value < low:
                guard = " (the z_min crash guard)" if self.attr_name == "z" else ""
                where = f"below the low limit {low:g} nm{guard}"
            else:
                where = f"above the high limit {high:g} nm"
            raise StageLimitError(f"{self.name}: {value:g} nm is {where}; nothing moved")

    def move(self, position: Any, wait: bool = True, **kwargs: Any) -> Any:
        """Move to ``position`` nm (see ``EpicsMotor.move``); fail fast on disconnect."""
        with self._move_lock:
            self._move, self._put_done_early = None, ()
        try:
            with put_flush_only():
                status = super().move(position, wait=False, **kwargs)
        except DisconnectedError:
            raise NvmriError(f"{self.name}: {self.prefix} is not connected "
                             "(IOC stopped or unreachable); nothing moved") from None
        watch_disconnect(self.user_readback, status, f"the move of {self.name}")
        with self._move_lock:
            self._move, early = status, self._put_done_early
        if early:                          # (the completion came before we got here)
            self._move_put_done(early[0])
        if wait:
            try:
                status.wait()
            except KeyboardInterrupt:
                self.stop()
                raise
        return status

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._move_lock = threading.Lock()
        self._move: Any = None                       # the status of the move in progress
        self._put_done_early: tuple[Any, ...] = ()

    def _move_put_done(self, target: Any) -> None:
        """The IOC completed the ``.VAL`` put: the move has ended, or it was refused.

        ophyd hands the put's completion and the ``DMOV`` monitor to different
        threads, so a move that has not finished here yet is looked at again
        a little later, with fresh reads, before it is called refused.
        """
        with self._move_lock:
            status = self._move
            if status is None:
                self._put_done_early = (target,)
                return
            self._move, self._put_done_early = None, ()

        def look() -> None:
            if not (status.done or self._started_moving):
                threading.Thread(target=self._fail_if_refused, args=(status, target),
                                 name=f"{self.name}-refused", daemon=True).start()

        if not (status.done or self._started_moving):
            call_later(_REFUSED_GRACE_S, look)

    def _fail_if_refused(self, status: Any, target: Any) -> None:
        try:
            done = self.motor_done_move.get(use_monitor=False)
            where = float(self.user_readback.get(use_monitor=False))
        except Exception:  # noqa: BLE001 - unreadable: the disconnect watch decides
            return
        if status.done or self._started_moving or done != 1 or abs(where - target) < 1e-9:
            return
        try:
            status.set_exception(NvmriError(
                f"{self.name}: the IOC did not move to {target!r} nm (refused; "
                f"still at {where!r} nm)"))
        except Exception:  # noqa: BLE001 - finished meanwhile: nothing to fail
            pass

    @required_for_connection
    def _move_changed(self, timestamp: Any = None, value: Any = None, sub_type: Any = None,
                      **kwargs: Any) -> None:
        """``.DMOV`` monitor: ``EpicsMotor._move_changed`` with the limit switches from monitors.

        ophyd's version makes a blocking CA get of ``.LLS``/``.HLS`` on the
        monitor thread at the end of every move (1-3 ms of ``ca.poll`` per
        point); the motor record posts the switches before ``DMOV``, so their
        monitored values are current.  Otherwise the same logic.
        """
        was_moving = self._moving
        self._moving = value != 1
        if not self._started_moving:
            self._started_moving = not was_moving and self._moving
            if self._started_moving:
                self._run_subs(sub_type=self.SUB_START, timestamp=timestamp, value=value,
                               **kwargs)
        if not (was_moving and not self._moving):
            return
        switch = (self.low_limit_switch if self.direction_of_travel.get() == 0
                  else self.high_limit_switch)
        success = switch.get() != 1
        severity = self.user_readback.alarm_severity
        if severity != AlarmSeverity.NO_ALARM:
            if severity > self.tolerated_alarm:
                self.log.error("Motion failed: %s is in an alarm state status=%s severity=%s",
                               self.name, self.user_readback.alarm_status, severity)
                success = False
            else:
                self.log.warning("Motor %s raised an alarm during motion status=%s "
                                 "severity %s", self.name, self.user_readback.alarm_status,
                                 severity)
        self._done_moving(success=success, timestamp=timestamp, value=value)

    def _with_units(self, described: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        by_key = {getattr(self, attr).name: unit for attr, unit in self.UNITS.items()}
        for key, desc in described.items():
            if not desc.get("units"):
                desc["units"] = by_key.get(key, "")
        return described

    def describe(self) -> dict[str, dict[str, Any]]:
        """``EpicsMotor.describe`` with ``units`` on every key (nm for positions)."""
        return self._with_units(super().describe())

    def describe_configuration(self) -> dict[str, dict[str, Any]]:
        """``EpicsMotor.describe_configuration`` with ``units`` on every key."""
        return self._with_units(super().describe_configuration())


class Stage(Device):
    """Tip-apex stage: ``x``, ``y``, ``z`` motor records ``<prefix>X`` etc., nm.

    Build it as ``Stage("NVMRI:STAGE:", name="stage")``.
    """

    x = Cpt(NmMotor, "X")
    y = Cpt(NmMotor, "Y")
    z = Cpt(NmMotor, "Z")

    @property
    def position(self) -> tuple[float, float, float]:
        """Readback (x, y, z), nm."""
        return (self.x.position, self.y.position, self.z.position)
