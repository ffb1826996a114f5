"""One stage axis as an EPICS motor record (``STAGE:X`` ...) over the engine's stage."""

from __future__ import annotations

import asyncio
import math

from caproto.server import PVGroup, pvproperty

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.schema import short
from nvmri_bluesky.sim.engine import AXES, Engine
from nvmri_bluesky.sim.ioc.records import post

__all__ = [
    "VELOCITY_RANGE_NM_PER_S", "StageAxis",
]

VELOCITY_RANGE_NM_PER_S = (1e-3, 1e7)
"""Range of a stage's ``VELO`` / ``JVEL``, nm/s."""
_TICK_S = 0.02          # motion update period at time scale > 0, wall s


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
            await post(f.limit_violation, 1)
            raise
        await post(f.limit_violation, 0)
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
        await post(f.done_moving_to_value, 0)
        await post(f.motor_is_moving, 1)
        await post(f.direction_of_travel, int(target >= start))
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
        await post(f.motor_is_moving, 0)
        await post(f.done_moving_to_value, 1)
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
        await post(f.user_readback_value, position)
        await post(f.dial_readback_value, position)

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
                await post(field, value)
        await fields.parent.write_metadata(lower_ctrl_limit=lo, upper_ctrl_limit=hi,
                                           lower_disp_limit=lo, upper_disp_limit=hi)


def _check_velocity(axis: str, field: str, value: float) -> float:
    """A velocity put must be finite and inside ``VELOCITY_RANGE_NM_PER_S``."""
    lo, hi = VELOCITY_RANGE_NM_PER_S
    if not (math.isfinite(value) and lo <= value <= hi):
        raise NvmriError(f"stage {axis}: {field} = {short(value)} nm/s refused: it must lie "
                         f"in [{lo:g}, {hi:g}] nm/s")
    return value
