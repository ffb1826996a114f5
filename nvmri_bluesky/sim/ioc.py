"""The simulated instrument as one caproto (asyncio) IOC on 127.0.0.1.

``python -m nvmri_bluesky.sim.ioc --scenario NAME|FILE --prefix P --time-scale S --port N``
serves the PVs of ``docs/architecture.md`` over one :class:`~.engine.Engine`:

- ``STAGE:X``, ``STAGE:Y``, ``STAGE:Z``: motor records (nm) that ``ophyd.EpicsMotor``
  drives.  A put to ``.VAL`` posts DMOV 0, the new RBV, then DMOV 1 (even for an
  instant move); with a time scale S > 0 the move takes S * distance / VELO
  wall seconds.  ``.VAL``'s control limits are ``.LLM``/``.HLM`` (ophyd refuses
  out-of-range moves client-side); the IOC refuses them too (the put fails and
  nothing moves), and ``STAGE:Z.LLM`` cannot go below the scenario's z_min.
- ``MW:`` and ``RF:``: ``FREQ``, ``POWER``, ``OUTPUT`` with ``_RBV`` readbacks.
- ``PG:PROGRAM`` (JSON, validated on put: a bad program is refused, with the
  reason in ``PG:MESSAGE`` and ``PG:STATUS`` = Error), ``PG:GATES``,
  ``PG:SHOTS``, ``PG:STATUS``, ``PG:MESSAGE``, ``PG:ACQUIRE`` (put 1 with
  completion: the counts are on the wire before the put completes).
- ``CNT:COUNTS``, ``CNT:ACQ_ID``; ``HEALTH:LASER_OK``, ``HEALTH:STAGE_OK``.

On startup the process prints ``NVMRI IOC ready prefix=<P> port=<N> pvs=<n>``
on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caproto import AlarmSeverity, AlarmStatus, ChannelAlarm, ChannelType
from caproto.server import PVGroup, PvpropertyInteger, SubGroup, pvproperty

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.net import LOOPBACK
from nvmri_bluesky.pulses import Program
from nvmri_bluesky.sim import access
from nvmri_bluesky.sim.engine import AXES, MAX_SHOTS, Engine
from nvmri_bluesky.sim.scenario import Scenario, list_scenarios, load_scenario

__all__ = ["NvmriIOC", "Autosave", "make_ioc", "serve", "main", "pv_names",
           "program_checksum", "MAX_PROGRAM_CHARS", "MAX_GATES", "MAX_SHOTS",
           "VELOCITY_RANGE_NM_PER_S"]

logger = logging.getLogger(__name__)

MAX_PROGRAM_CHARS = 200_000
MAX_GATES = 4096
VELOCITY_RANGE_NM_PER_S = (1e-3, 1e7)
"""Range of a stage's ``VELO`` / ``JVEL``, nm/s."""
_TICK_S = 0.02          # motion update period at time scale > 0, wall s
_ON_OFF = ("Off", "On")
_HEALTH = ("Fault", "OK")


def _text_pv(name: str, value: str, max_length: int, doc: str, read_only: bool = True):
    return pvproperty(name=name, value=value, dtype=ChannelType.CHAR, max_length=max_length,
                      string_encoding="utf-8", read_only=read_only, doc=doc,
                      max_subscription_backlog=10)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a refusal message stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _reason(exc: BaseException) -> str:
    """The readable reason of ``exc``: its message, with the type when it is not ours."""
    text = " ".join(str(exc).split())[:500] or "no message"
    return text if isinstance(exc, NvmriError) else f"{type(exc).__name__}: {text}"


def program_checksum(text: str) -> str:
    """``PG:CHECKSUM`` of a loaded program: the SHA-256 hex digest of its JSON text (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=64)
def _parse_program(text: str) -> Program:
    """``Program.from_json``, remembered: plans load the same few programs again and again
    (a lock's comb search and the program it restores, each run's ``prepare``)."""
    return Program.from_json(text)


class _NoWriteAlarm(ChannelAlarm):
    """A PV's alarm that a refused put does not raise.

    caproto puts a record in WRITE/MAJOR alarm whenever a putter refuses a
    value, and leaves it there: the next ophyd move of a motor whose ``.LLM``
    put was refused then fails with "in an alarm state".  A refusal here fails
    the put and changes nothing, as an EPICS record's does.
    """

    async def write(self, *, status=None, severity=None, **kwargs):
        if status == AlarmStatus.WRITE and severity == AlarmSeverity.MAJOR_ALARM:
            return None
        return await super().write(status=status, severity=severity, **kwargs)


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


async def _post(channel, value) -> None:
    """Write an IOC-owned field and post it to monitors, only if its value changes.

    (As a record posts a field only when it changed.)  The value comes from
    the IOC itself, so the put-side checks (limits, putter) are skipped.
    """
    if channel.value != value:
        await channel.write(value, verify_value=False)


class StageAxis(PVGroup):
    """One stage axis as a motor record (the PV is the group's prefix).

    What clients of the EPICS motor record use behaves as in the record:
    a put to ``.VAL`` completes (put-callback) when the move has ended
    (``DMOV`` 1); a target outside ``.LLM``/``.HLM`` sets ``LVIO`` 1 and
    fails the put, nothing moves; ``SPMG`` Stop (halt, VAL = RBV), Pause
    (halt, keep VAL), Go/Move (move to VAL); ``TWF``/``TWR`` move by ``TWV``;
    ``RLV`` moves relative; ``JOGF``/``JOGR`` move towards the high/low
    limit at ``JVEL`` while 1; ``HOMF``/``HOMR`` are refused (no home
    switch); ``VELO``/``JVEL`` must lie in ``VELOCITY_RANGE_NM_PER_S``;
    ``DHLM``/``DLLM`` equal ``HLM``/``LLM`` (no offset, positive direction).
    A refused put leaves no alarm on the record.
    """

    motor = pvproperty(name="", value=0.0, record="motor", precision=3, units="nm",
                       doc="tip apex position, nm")

    def __init__(self, *args, axis: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.axis = axis
        self._motion: asyncio.Task | None = None
        self._path: tuple[float, float, float, float] | None = None   # t0, from, to, s
        self._arrived = asyncio.Event()
        self._goal = 0.0                  # where the current put sends the stage, nm

    @property
    def engine(self) -> Engine:
        return self.parent.engine

    @motor.startup
    async def motor(self, instance, async_lib):
        f = instance.field_inst
        lo, hi = self.engine.limits(self.axis)
        saved = self.parent.autosave.axis(self.axis, (lo, hi))
        position = saved.get("position", float(self.engine.position[AXES.index(self.axis)]))
        self.engine.position[AXES.index(self.axis)] = position
        velocity = self.engine.scenario.stage.velocity_nm_per_s
        await f.engineering_units.write("nm")
        await f.velocity.write(velocity)
        await f.jog_velocity.write(velocity)
        await f.tweak_step_size.write(1.0)
        await f.seconds_to_velocity.write(0.0)
        await f.motor_step_size.write(1e-3)
        for field in (f.user_low_limit, f.user_high_limit, f.dial_low_limit, f.dial_high_limit):
            await field.write_metadata(lower_ctrl_limit=lo, upper_ctrl_limit=hi)
        await self._apply_limits(f, saved.get("llm", lo), saved.get("hlm", hi))
        await instance.write(position, verify_value=False)
        await self._readback(position)
        await f.limit_violation.write(0, verify_value=False)
        await f.done_moving_to_value.write(1)

    @motor.putter
    async def motor(self, instance, value):
        f = instance.field_inst
        if f.set_use_switch.value == "Set":
            raise NvmriError(f"stage {self.axis}: calibration (SET) is not supported")
        value = float(value)
        try:
            self.engine.check_move(self.axis, value)           # the crash guard
            self._check_soft_limits(f, value)
        except NvmriError:
            await _post(f.limit_violation, 1)
            raise
        await _post(f.limit_violation, 0)
        if f.stop_pause_move_go.value in ("Stop", "Pause"):
            return value                                       # moves on Go
        self._arrived.clear()
        self._goal = value
        await self._start(f, value, self._velocity(f.velocity))
        await self._arrived.wait()                             # put-completion: move ended
        return self._goal                                      # (RBV if it was stopped)

    def _check_soft_limits(self, f, value: float) -> None:
        lo, hi = float(f.user_low_limit.value), float(f.user_high_limit.value)
        if not lo <= value <= hi:
            raise NvmriError(f"stage {self.axis} = {value} nm refused: outside the soft "
                             f"limits [{lo}, {hi}] nm (LVIO)")

    def _velocity(self, field) -> float:
        return float(field.value) or self.engine.scenario.stage.velocity_nm_per_s

    async def _start(self, f, target: float, velocity: float) -> None:
        """Start a move to ``target`` (timed at time scale > 0, else instant)."""
        start = self._halt()
        await _post(f.done_moving_to_value, 0)
        await _post(f.motor_is_moving, 1)
        await _post(f.direction_of_travel, int(target >= start))
        scale = self.parent.time_scale
        if scale > 0 and target != start:
            duration = scale * abs(target - start) / velocity
            self._motion = asyncio.create_task(self._move(f, start, target, duration,
                                                          velocity))
        else:
            await self._arrive(f, target, velocity)

    def _where(self) -> float:
        """Current position, nm (interpolated during a timed move)."""
        if self._path is None:
            return float(self.motor.field_inst.user_readback_value.value)
        t0, start, target, duration = self._path
        done = min(1.0, (asyncio.get_running_loop().time() - t0) / duration)
        return start + (target - start) * done

    def _halt(self) -> float:
        """Cancel a move in progress; return where the stage is, nm."""
        position = self._where()
        if self._motion is not None:
            self._motion.cancel()
            self._motion, self._path = None, None
            self.engine.move(self.axis, position)
        return position

    async def _move(self, f, start: float, target: float, duration: float,
                    velocity: float) -> None:
        """A timed move: RBV updates every tick, DMOV 1 after ``duration`` wall s."""
        loop = asyncio.get_running_loop()
        self._path = (loop.time(), start, target, duration)
        try:
            while (left := self._path[0] + duration - loop.time()) > 0:
                await asyncio.sleep(min(_TICK_S, left))
                position = self._where()
                self.engine.move(self.axis, position, velocity)
                await self._readback(position)
        except asyncio.CancelledError:               # a new target or STOP
            return
        self._motion, self._path = None, None
        await self._arrive(f, target, velocity)

    async def _arrive(self, f, position: float, velocity: float | None = None) -> None:
        self.engine.move(self.axis, position, velocity)
        await self._readback(position)
        await _post(f.motor_is_moving, 0)
        await _post(f.done_moving_to_value, 1)
        self._arrived.set()
        self._save(f)
        await self.parent.update_stage_health()

    async def _stop_here(self, fields, keep_target: bool = False) -> None:
        """Halt a move where it is (``keep_target``: VAL keeps the goal, as SPMG Pause)."""
        if self._motion is None:
            return
        position = self._halt()
        if not keep_target:
            self._goal = position
            await fields.parent.write(position, verify_value=False)
        await self._arrive(fields, position)

    async def _readback(self, position: float) -> None:
        f = self.motor.field_inst
        await _post(f.user_readback_value, position)
        await _post(f.dial_readback_value, position)

    def _save(self, f) -> None:
        self.parent.autosave.store(self.axis, position=float(f.user_readback_value.value),
                                   llm=float(f.user_low_limit.value),
                                   hlm=float(f.user_high_limit.value))

    @motor.fields.set_use_switch.putter
    async def motor(fields, instance, value):
        if value == "Set":
            raise NvmriError(f"stage {fields.parent.group.axis}: calibration (SET) is not "
                             "supported: the stage's positions are absolute")
        return value

    @motor.fields.stop.putter
    async def motor(fields, instance, value):
        if value:
            await fields.parent.group._stop_here(fields)
        return 0

    @motor.fields.stop_pause_move_go.putter
    async def motor(fields, instance, value):
        axis = fields.parent.group
        if value in ("Stop", "Pause"):
            await axis._stop_here(fields, keep_target=value == "Pause")
        elif float(fields.parent.value) != axis._where():      # Go/Move: on to VAL
            axis._arrived.clear()
            await axis._start(fields, float(fields.parent.value),
                              axis._velocity(fields.velocity))
        return value

    async def _relative(self, fields, step: float) -> None:
        """Move by ``step`` nm from the target (TWF/TWR/RLV); completes when the move ends."""
        await fields.parent.write(float(fields.parent.value) + step)

    @motor.fields.tweak_motor_forward.putter
    async def motor(fields, instance, value):
        if value:
            await fields.parent.group._relative(fields, abs(fields.tweak_step_size.value))
        return 0

    @motor.fields.tweak_motor_reverse.putter
    async def motor(fields, instance, value):
        if value:
            await fields.parent.group._relative(fields, -abs(fields.tweak_step_size.value))
        return 0

    @motor.fields.relative_value.putter
    async def motor(fields, instance, value):
        if value:
            await fields.parent.group._relative(fields, float(value))
        return 0

    async def _jog(self, fields, value: int, toward: float) -> int:
        """JOGF/JOGR: 1 moves towards ``toward`` at JVEL, 0 stops where the stage is."""
        if not value:
            await self._stop_here(fields)
            return 0
        await fields.parent.write(toward, verify_value=False)    # VAL: the jog's goal
        self._arrived.clear()
        await self._start(fields, toward, self._velocity(fields.jog_velocity))
        return 1

    @motor.fields.jog_motor_forward.putter
    async def motor(fields, instance, value):
        return await fields.parent.group._jog(fields, value, fields.user_high_limit.value)

    @motor.fields.jog_motor_reverse.putter
    async def motor(fields, instance, value):
        return await fields.parent.group._jog(fields, value, fields.user_low_limit.value)

    @motor.fields.home_forward.putter
    async def motor(fields, instance, value):
        raise NvmriError(f"stage {fields.parent.group.axis}: homing (HOMF) is not supported: "
                         "the stage has no home switch; move to a position instead")

    @motor.fields.home_reverse.putter
    async def motor(fields, instance, value):
        raise NvmriError(f"stage {fields.parent.group.axis}: homing (HOMR) is not supported: "
                         "the stage has no home switch; move to a position instead")

    @motor.fields.velocity.putter
    async def motor(fields, instance, value):
        return _check_velocity(fields.parent.group.axis, "VELO", value)

    @motor.fields.jog_velocity.putter
    async def motor(fields, instance, value):
        return _check_velocity(fields.parent.group.axis, "JVEL", value)

    @motor.fields.user_low_limit.putter
    async def motor(fields, instance, value):
        return await fields.parent.group._set_limit(fields, lo=value)

    @motor.fields.user_high_limit.putter
    async def motor(fields, instance, value):
        return await fields.parent.group._set_limit(fields, hi=value)

    @motor.fields.dial_low_limit.putter
    async def motor(fields, instance, value):
        return await fields.parent.group._set_limit(fields, lo=value, putting="DLLM")

    @motor.fields.dial_high_limit.putter
    async def motor(fields, instance, value):
        return await fields.parent.group._set_limit(fields, hi=value, putting="DHLM")

    async def _set_limit(self, fields, lo: float | None = None, hi: float | None = None,
                         putting: str = ""):
        """Narrow the soft limits within the stage travel (z never below z_min)."""
        travel = self.engine.limits(self.axis)
        new_lo = float(fields.user_low_limit.value if lo is None else lo)
        new_hi = float(fields.user_high_limit.value if hi is None else hi)
        if not (math.isfinite(new_lo) and math.isfinite(new_hi)
                and travel[0] <= new_lo < new_hi <= travel[1]):
            raise NvmriError(f"stage {self.axis}: soft limits [{new_lo}, {new_hi}] nm must lie "
                             f"within the travel [{travel[0]}, {travel[1]}] nm")
        putting = putting or ("LLM" if lo is not None else "HLM")
        await self._apply_limits(fields, new_lo, new_hi, skip=putting)
        self.parent.autosave.store(self.axis, position=float(fields.user_readback_value.value),
                                   llm=new_lo, hlm=new_hi)
        return new_lo if lo is not None else new_hi

    async def _apply_limits(self, fields, lo: float, hi: float, skip: str = "") -> None:
        """Post LLM/HLM and DLLM/DHLM (except the field being put) and VAL's control limits."""
        for name, field, value in (("LLM", fields.user_low_limit, lo),
                                   ("HLM", fields.user_high_limit, hi),
                                   ("DLLM", fields.dial_low_limit, lo),
                                   ("DHLM", fields.dial_high_limit, hi)):
            if name != skip:
                await _post(field, value)
        await fields.parent.write_metadata(lower_ctrl_limit=lo, upper_ctrl_limit=hi,
                                           lower_disp_limit=lo, upper_disp_limit=hi)


def _check_velocity(axis: str, field: str, value: float) -> float:
    """A velocity put must be finite and inside ``VELOCITY_RANGE_NM_PER_S``."""
    lo, hi = VELOCITY_RANGE_NM_PER_S
    if not (math.isfinite(value) and lo <= value <= hi):
        raise NvmriError(f"stage {axis}: {field} = {_short(value)} nm/s refused: it must lie "
                         f"in [{lo:g}, {hi:g}] nm/s")
    return value


class Source(PVGroup):
    """A signal generator: ``FREQ``, ``POWER``, ``OUTPUT`` and their ``_RBV``."""

    freq = pvproperty(name="FREQ", value=0.0, units="Hz", precision=1,
                      lower_ctrl_limit=1e5, upper_ctrl_limit=4e10, doc="carrier, Hz")
    freq_rbv = pvproperty(name="FREQ_RBV", value=0.0, units="Hz", precision=1,
                          read_only=True)
    power = pvproperty(name="POWER", value=0.0, units="dBm", precision=2,
                       lower_ctrl_limit=-120.0, upper_ctrl_limit=30.0, doc="power, dBm")
    power_rbv = pvproperty(name="POWER_RBV", value=0.0, units="dBm", precision=2,
                           read_only=True)
    output = pvproperty(name="OUTPUT", value="Off", dtype=ChannelType.ENUM,
                        enum_strings=_ON_OFF)
    output_rbv = pvproperty(name="OUTPUT_RBV", value="Off", dtype=ChannelType.ENUM,
                            enum_strings=_ON_OFF, read_only=True)

    def __init__(self, *args, source: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = getattr(self.parent.engine, source)

    @freq.startup
    async def freq(self, instance, async_lib):
        await instance.write(self.source.freq_hz)
        await self.freq_rbv.write(self.source.freq_hz)
        await self.power.write(self.source.power_dbm)
        await self.power_rbv.write(self.source.power_dbm)

    @freq.putter
    async def freq(self, instance, value):
        self.source.freq_hz = _finite(instance, value)
        await _post(self.freq_rbv, value)

    @power.putter
    async def power(self, instance, value):
        self.source.power_dbm = _finite(instance, value)
        await _post(self.power_rbv, value)

    @output.putter
    async def output(self, instance, value):
        self.source.on = value == "On"
        await _post(self.output_rbv, value)


def _finite(instance, value: float) -> float:
    """``value`` if finite (caproto's limit check lets NaN through), else refuse the put."""
    if not math.isfinite(value):
        raise NvmriError(f"{instance.pvspec.name}: {_short(value)} refused: not a finite number")
    return float(value)


class _BoundedInteger(PvpropertyInteger):
    """An integer PV whose putter checks the bounds (caproto's own check would refuse
    out-of-range values before the putter, so ``PG:MESSAGE`` would not say why)."""

    async def verify_value(self, value):
        return await self.putter(self, value)


class NvmriIOC(PVGroup):
    """The whole simulated instrument: stage, MW, RF, pulser, counter, health."""

    stage_x = SubGroup(StageAxis, prefix="STAGE:X", axis="x")
    stage_y = SubGroup(StageAxis, prefix="STAGE:Y", axis="y")
    stage_z = SubGroup(StageAxis, prefix="STAGE:Z", axis="z")
    mw = SubGroup(Source, prefix="MW:", source="mw")
    rf = SubGroup(Source, prefix="RF:", source="rf")

    program = _text_pv("PG:PROGRAM", "", MAX_PROGRAM_CHARS, "pulse program, JSON",
                       read_only=False)
    gates = _text_pv("PG:GATES", "[]", 65536, "gate names of the program, JSON list")
    message = _text_pv("PG:MESSAGE", "no program loaded", 4096, "OK or why not")
    checksum = _text_pv("PG:CHECKSUM", "", 64,
                        "SHA-256 hex digest of the loaded program's JSON text")
    status = pvproperty(name="PG:STATUS", value="Idle", dtype=ChannelType.ENUM,
                        enum_strings=("Idle", "Acquiring", "Error"), read_only=True)
    shots = pvproperty(name="PG:SHOTS", value=1000, dtype=_BoundedInteger, lower_ctrl_limit=1,
                       upper_ctrl_limit=MAX_SHOTS, doc="shots per gate per acquisition")
    acquire = pvproperty(name="PG:ACQUIRE", value=0,
                         doc="put 1 with completion; completes when the counts are posted")
    counts = pvproperty(name="CNT:COUNTS", value=[0.0], max_length=MAX_GATES,
                        read_only=True, units="counts", doc="per-gate counts")
    acq_id = pvproperty(name="CNT:ACQ_ID", value=0, read_only=True)
    laser_ok = pvproperty(name="HEALTH:LASER_OK", value="OK", dtype=ChannelType.ENUM,
                          enum_strings=_HEALTH, read_only=True)
    stage_ok = pvproperty(name="HEALTH:STAGE_OK", value="OK", dtype=ChannelType.ENUM,
                          enum_strings=_HEALTH, read_only=True)

    def __init__(self, *args, engine: Engine, autosave: Autosave | None = None, **kwargs):
        self.engine = engine
        self.time_scale = engine.time_scale
        self.autosave = autosave or Autosave()
        self.context = None            # the caproto Context, set by serve()
        self._lock = asyncio.Lock()
        super().__init__(*args, **kwargs)
        for channel in self.pvdb.values():
            fields = getattr(channel, "field_inst", None)
            for each in [channel, *(fields.pvdb.values() if fields is not None else ())]:
                if type(each.alarm) is ChannelAlarm:
                    each.alarm.__class__ = _NoWriteAlarm

    @shots.startup
    async def shots(self, instance, async_lib):
        await instance.write(self.engine.shots)

    @shots.putter
    async def shots(self, instance, value):
        try:
            shots = self.engine.set_shots(value)
        except NvmriError as exc:
            await self._error(f"shots refused: {exc}")
            raise
        await self._ok()
        return shots

    @program.putter
    async def program(self, instance, value):
        try:
            if len(value) >= MAX_PROGRAM_CHARS:
                raise NvmriError(f"the program has {len(value)} or more characters; "
                                 f"PG:PROGRAM holds fewer than {MAX_PROGRAM_CHARS}")
            loaded = _parse_program(value)
            if len(loaded.gates) > MAX_GATES:
                raise NvmriError(f"{len(loaded.gates)} gates; the counter holds {MAX_GATES}")
            self.engine.load(loaded)
        except Exception as exc:
            await self._error(f"program refused: {_reason(exc)}")
            raise NvmriError(f"program refused: {_reason(exc)}") from None
        await self.gates.write(json.dumps(loaded.gate_names))
        await self.checksum.write(program_checksum(value))
        await self._ok()

    async def _ok(self) -> None:
        """A put was applied: ``PG:MESSAGE`` "OK", ``PG:STATUS`` Idle."""
        await _post(self.message, "OK")
        await _post(self.status, "Idle")

    @acquire.putter
    async def acquire(self, instance, value):
        if not value:
            return 0
        async with self._lock:
            engine = self.engine
            if engine.program is None:
                await self._error("no pulse program loaded")
                raise NvmriError("no pulse program loaded")
            wait = self.time_scale * engine.acquisition_time()
            if wait:
                await self.status.write("Acquiring")
            for fault in engine.faults_starting("ioc_pause"):
                await asyncio.sleep(fault.seconds)
            for fault in engine.faults_starting("laser_off"):
                await self._laser_off(fault.seconds)
            try:
                counts = engine.acquire()
            except Exception as exc:       # any failure: its reason, and the IOC goes on
                if not isinstance(exc, NvmriError):
                    logger.exception("acquisition %d failed", engine.acquisitions)
                await self._error(f"acquisition failed: {_reason(exc)}")
                raise NvmriError(f"acquisition failed: {_reason(exc)}") from None
            if wait:
                await asyncio.sleep(wait)
            # IOC-owned outputs: no put-side checks (the putter of PG:ACQUIRE writes them)
            await self.counts.write(counts, verify_value=False)
            await self.acq_id.write(engine.acquisitions, verify_value=False)
            if self.status.value != "Idle":
                await self._ok()
            await self.update_stage_health()
        return 0      # the circuit sends COUNTS and ACQ_ID before this completion

    async def _error(self, text: str) -> None:
        await self.message.write(" ".join(text.split())[:4000])
        await self.status.write("Error")

    async def _laser_off(self, seconds: float) -> None:
        self.engine.laser_on = False
        await self.laser_ok.write("Fault")

        async def restore():
            await asyncio.sleep(seconds)
            self.engine.laser_on = True
            await self.laser_ok.write("OK")

        asyncio.get_running_loop().create_task(restore())

    async def update_stage_health(self) -> None:
        ok = _HEALTH[self.engine.stage_ok]
        if self.stage_ok.value != ok:
            await self.stage_ok.write(ok)


def _context_class() -> type:
    """caproto's asyncio server ``Context`` with a circuit that sends in batches.

    caproto sends every monitor update with its own ``send()`` syscall, a
    few event-loop passes after it was posted (the context's queue task, then
    the circuit's), and a put's completion before the updates the put caused.
    This circuit

    - sends all subscription updates that are queued in one write (a stage
      move posts DMOV, MOVN, TDIR, RBV, MOVN, DMOV, VAL: one TCP segment
      instead of seven; the client's CA thread then wakes once);
    - right after a put has been processed, dispatches the updates it posted
      itself (the same caproto calls the queue tasks make) and sends them;
    - sends a put's completion (``WriteNotifyResponse``) in the same write,
      after those updates (so after a completed put the client's monitor
      cache is already fresh: counts, readbacks).

    Nothing is delayed: updates that are not caused by a put (timed moves,
    status changes during a timed acquisition) go out as soon as the queue
    tasks see them.  (caproto's own loop either sends each update alone or,
    under load, holds them up to ``CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC``,
    10 ms, to batch them.)
    """
    import caproto as ca
    from caproto.asyncio.server import Context, VirtualCircuit
    from caproto.server.common import DisconnectedCircuit

    class _Circuit(VirtualCircuit):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._held: list[bytes] | None = None

        async def _send_buffers(self, *buffers):
            if self._held is not None:
                self._held.extend(buffers)
            else:
                await self.client.send(b"".join(buffers))

        async def send(self, *commands):
            if not commands:            # caproto "sends" the empty reply to every put
                return None
            if (self._held is not None or not self.connected
                    or not any(isinstance(c, ca.WriteNotifyResponse) for c in commands)):
                return await super().send(*commands)
            self._held = []
            try:
                await self._settle()
                await super().send(*commands)
            finally:
                held, self._held = self._held, None
                if held:
                    try:
                        await self.client.send(b"".join(held))
                    except (OSError, ca.CaprotoNetworkError) as ex:
                        raise DisconnectedCircuit(f"Circuit disconnected: {ex}") from ex

        async def _start_write_task(self, handle_write):
            async def write_and_post():
                await handle_write()
                # a put without completion (a motor move): its updates go out now too
                if self.connected:
                    with contextlib.suppress(DisconnectedCircuit):
                        await self._settle()

            self.tasks.create(write_and_post())

        async def _settle(self) -> None:
            """Dispatch the updates queued so far to their circuits and send this circuit's.

            Does inline what the context's and this circuit's queue loops would
            do a few event-loop passes later (same caproto calls, same order).
            """
            ctx = self.context
            for _ in range(10_000):
                if ctx.subscription_queue.empty():
                    break
                await ctx._subscription_queue_iteration(*ctx.subscription_queue.get_nowait())
            if not self.subscription_queue.empty():
                await self._send_updates([self.subscription_queue.get_nowait()])

        async def _send_updates(self, refs: list) -> None:
            """Send the updates ``refs`` and every other one queued, in one write."""
            queue = self.subscription_queue
            while not queue.empty():
                refs.append(queue.get_nowait())
            commands = [c for c in (ref() for ref in refs) if c is not None]
            if not commands:            # expired (a slow client's backlog)
                return
            # never an update after its subscription was cancelled
            live = {sub.subscriptionid for subs in self.subscriptions.values() for sub in subs}
            commands = [c for c in commands if c.subscriptionid in live]
            if commands:
                await self.send(*commands)

        async def subscription_queue_loop(self):
            self.events_on.set()
            while True:
                try:
                    refs = [await self.subscription_queue.get()]
                except asyncio.CancelledError:
                    break
                try:
                    await self._send_updates(refs)
                except DisconnectedCircuit:
                    await self._on_disconnect()
                    self.circuit.disconnect()
                    await self.context.circuit_disconnected(self)
                    break

    class _Context(Context):
        CircuitClass = _Circuit

        async def tcp_handler(self, client, addr):
            # caproto's sockets are created with proto 0, so asyncio does not
            # set TCP_NODELAY: Nagle then holds a put's completion behind the
            # monitor update sent just before it until the client's delayed
            # ACK (up to 40 ms per put).
            sock = client.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return await super().tcp_handler(client, addr)

    return _Context


class _DropRefusals(logging.Filter):
    """Keep expected refusals out of the IOC's log (NvmriError, caproto's limit and
    conversion refusals: a value outside the limits, an enum index that does not exist)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NvmriError) or type(exc).__name__ in _REFUSALS
                    or _in_conversion(exc))


def _in_conversion(exc: BaseException | None) -> bool:
    """True if ``exc`` came from caproto converting a put's data (a value it cannot take)."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "convert_values":
            return True
        tb = tb.tb_next
    return False


_REFUSALS = ("CannotExceedLimits", "CaprotoConversionError")


def make_ioc(scenario: Scenario | str | None = None, prefix: str = "NVMRI:",
             time_scale: float = 0.0, autosave: str | os.PathLike | None = None) -> NvmriIOC:
    """Build the IOC over a fresh :class:`Engine` (not yet serving)."""
    return NvmriIOC(prefix=prefix, engine=Engine(scenario, time_scale=time_scale),
                    autosave=Autosave(autosave))


def _check_port_free(port: int) -> None:
    """Refuse a CA port that another process holds (UDP search or TCP) on 127.0.0.1."""
    for kind, name in ((socket.SOCK_DGRAM, "UDP"), (socket.SOCK_STREAM, "TCP")):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:      # (a closed connection's TIME_WAIT is no holder)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, port))
            except OSError as exc:
                raise NvmriError(f"--port {port} is taken on 127.0.0.1 ({name}: "
                                 f"{exc.strerror}); choose a free port") from None


def serve(scenario: Scenario | str | None = None, prefix: str = "NVMRI:",
          time_scale: float = 0.0, port: int | None = None,
          autosave: str | os.PathLike | None = None, exit_with_parent: bool = False) -> None:
    """Serve the simulated instrument on 127.0.0.1 until interrupted (blocking).

    Parameters
    ----------
    scenario : Scenario, name or path, optional
        Default: the ``default`` built-in scenario.
    prefix : str
        PV prefix.
    time_scale : float
        Wall seconds per simulated second of acquisitions and moves (0: instant).
    port : int, optional
        CA server (UDP search and first TCP) port; default the EPICS environment's.
        A port that another process holds is refused (:class:`NvmriError`).
    autosave : str or Path, optional
        File that keeps stage positions and soft limits across restarts.
    exit_with_parent : bool
        Stop (as on Ctrl-C) when the process that started this one is gone, so
        an IOC whose launcher was killed (SIGKILL, a crash) does not stay behind.

    Notes
    -----
    Call from the main thread: SIGINT stops the IOC even where the process
    inherited it ignored.
    """
    # SIGINT is how launchers stop an IOC, also when this process inherited it
    # ignored (started in the background by a shell without job control, nohup, CI)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if port is not None:
        _check_port_free(port)
        os.environ["EPICS_CA_SERVER_PORT"] = os.environ["EPICS_CAS_SERVER_PORT"] = str(port)
    logging.getLogger("caproto").addFilter(_DropRefusals())
    for name in ("caproto.ctx", "caproto.circ"):
        logging.getLogger(name).addFilter(_DropRefusals())
    ioc = make_ioc(scenario, prefix, time_scale, autosave)
    _Context = _context_class()

    policy = access.policy_from_env()  # CA access security: nvmri_bluesky/sim/access.py
    access.install(ioc.pvdb, policy)

    async def run() -> None:
        ctx = _Context(ioc.pvdb, access.interfaces_from_env())
        ioc.context = ctx

        async def ready(async_lib) -> None:
            while ctx.port is None:
                await asyncio.sleep(0.01)
            print(f"NVMRI IOC ready prefix={prefix} port={ctx.port} pvs={len(ioc.pvdb)}; "
                  f"{policy.describe()}", flush=True)

        if exit_with_parent:
            asyncio.get_running_loop().create_task(_exit_with_parent(os.getppid()))
        await ctx.run(startup_hook=ready)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


async def _exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """SIGINT to this process once its parent ``parent`` has gone (it is re-parented)."""
    while os.getppid() == parent:
        await asyncio.sleep(period_s)
    print(f"NVMRI IOC: parent process {parent} is gone; stopping", flush=True)
    os.kill(os.getpid(), signal.SIGINT)


def pv_names(prefix: str = "NVMRI:") -> list[str]:
    """Every PV the IOC serves (motor records listed by record name)."""
    ioc = NvmriIOC(prefix=prefix, engine=Engine("paper-fig2"))
    return list(ioc.pvdb)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nvmri_bluesky.sim.ioc``: serve the simulated instrument."""
    parser = argparse.ArgumentParser(prog="nvmri-sim-ioc", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        run_from_args(parser.parse_args(argv))
    except NvmriError as exc:
        print(f"nvmri sim-ioc: {exc}", file=sys.stderr)
        return 2
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nvmri sim-ioc`` (and ``python -m nvmri_bluesky.sim.ioc``): one parser."""
    parser.add_argument("--scenario", default="default",
                        help=f"built-in name ({', '.join(list_scenarios())}) or a "
                             ".json/.yaml file")
    parser.add_argument("--prefix", default="NVMRI:", help="PV prefix (default NVMRI:)")
    parser.add_argument("--time-scale", type=float, default=0.0,
                        help="wall seconds per simulated second (default 0: instant)")
    parser.add_argument("--port", type=int, default=None,
                        help="CA server port (default: EPICS env); a taken port is refused")
    parser.add_argument("--autosave", default=None,
                        help="file keeping stage positions and soft limits across restarts")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop when the process that started this one is gone")
    parser.add_argument("--list-pvs", action="store_true", help="print the PV names and exit")


def run_from_args(args: argparse.Namespace) -> None:
    """Serve (or list the PVs) as the parsed :func:`add_arguments` options say."""
    if args.time_scale < 0:
        raise NvmriError(f"--time-scale must be >= 0, got {args.time_scale}")
    if args.list_pvs:
        print("\n".join(pv_names(args.prefix)))
        return
    serve(load_scenario(args.scenario), args.prefix, args.time_scale, args.port,
          args.autosave, exit_with_parent=args.exit_with_parent)


if __name__ == "__main__":
    sys.exit(main())

