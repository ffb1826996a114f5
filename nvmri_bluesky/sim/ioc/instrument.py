"""The whole instrument's PV group: stage axes, sources, pulser, counter, health."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging

from caproto import ChannelAlarm, ChannelType
from caproto.server import PVGroup, PvpropertyInteger, SubGroup, pvproperty

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.pulses import Program
from nvmri_bluesky.sim.engine import MAX_SHOTS, Engine
from nvmri_bluesky.sim.ioc.autosave import Autosave
from nvmri_bluesky.sim.ioc.motor import StageAxis
from nvmri_bluesky.sim.ioc.records import NoWriteAlarm, post
from nvmri_bluesky.sim.ioc.source import Source

__all__ = [
    "MAX_PROGRAM_CHARS", "MAX_GATES", "program_checksum", "NvmriIOC",
]

logger = logging.getLogger("nvmri_bluesky.sim.ioc")

MAX_PROGRAM_CHARS = 200_000
MAX_GATES = 4096
_HEALTH = ("Fault", "OK")


def _text_pv(name: str, value: str, max_length: int, doc: str, read_only: bool = True):
    return pvproperty(name=name, value=value, dtype=ChannelType.CHAR, max_length=max_length,
                      string_encoding="utf-8", read_only=read_only, doc=doc,
                      max_subscription_backlog=10)


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
                    each.alarm.__class__ = NoWriteAlarm

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
        await post(self.message, "OK")
        await post(self.status, "Idle")

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
