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
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence

from caproto import ChannelType
from caproto.server import PVGroup, SubGroup, pvproperty

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans.pulses import Program
from nvmri_bluesky.sim import access
from nvmri_bluesky.sim.engine import AXES, Engine
from nvmri_bluesky.sim.scenario import Scenario, list_scenarios, load_scenario

__all__ = ["NvmriIOC", "make_ioc", "serve", "main", "pv_names", "MAX_PROGRAM_CHARS",
           "MAX_GATES"]

MAX_PROGRAM_CHARS = 200_000
MAX_GATES = 4096
_TICK_S = 0.02          # motion update period at time scale > 0, wall s
_ON_OFF = ("Off", "On")
_HEALTH = ("Fault", "OK")


def _text_pv(name: str, value: str, max_length: int, doc: str, read_only: bool = True):
    return pvproperty(name=name, value=value, dtype=ChannelType.CHAR, max_length=max_length,
                      string_encoding="utf-8", read_only=read_only, doc=doc,
                      max_subscription_backlog=10)


async def _post(channel, value) -> None:
    """Write an IOC-owned field and post it to monitors, only if its value changes.

    (As a record posts a field only when it changed.)  The value comes from
    the IOC itself, so the put-side checks (limits, putter) are skipped.
    """
    if channel.value != value:
        await channel.write(value, verify_value=False)


class StageAxis(PVGroup):
    """One stage axis as a motor record (the PV is the group's prefix)."""

    motor = pvproperty(name="", value=0.0, record="motor", precision=3, units="nm",
                       doc="tip apex position, nm")

    def __init__(self, *args, axis: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.axis = axis
        self._motion: asyncio.Task | None = None
        self._path: tuple[float, float, float, float] | None = None   # t0, from, to, s

    @property
    def engine(self) -> Engine:
        return self.parent.engine

    @motor.startup
    async def motor(self, instance, async_lib):
        f = instance.field_inst
        lo, hi = self.engine.limits(self.axis)
        position = float(self.engine.position[AXES.index(self.axis)])
        await f.engineering_units.write("nm")
        await f.velocity.write(self.engine.scenario.stage.velocity_nm_per_s)
        await f.seconds_to_velocity.write(0.0)
        await f.motor_step_size.write(1e-3)
        await f.user_low_limit.write(lo, verify_value=False)
        await f.user_high_limit.write(hi, verify_value=False)
        await instance.write_metadata(lower_ctrl_limit=lo, upper_ctrl_limit=hi,
                                      lower_disp_limit=lo, upper_disp_limit=hi)
        await instance.write(position, verify_value=False)
        await self._readback(position)
        await f.done_moving_to_value.write(1)

    @motor.putter
    async def motor(self, instance, value):
        f = instance.field_inst
        if f.set_use_switch.value == "Set":
            raise NvmriError(f"stage {self.axis}: calibration (SET) is not supported")
        self.engine.check_move(self.axis, value)           # the crash guard
        start = self._halt()
        await _post(f.done_moving_to_value, 0)
        await _post(f.motor_is_moving, 1)
        await _post(f.direction_of_travel, int(value >= start))
        scale = self.parent.time_scale
        velocity = float(f.velocity.value) or self.engine.scenario.stage.velocity_nm_per_s
        if scale > 0 and value != start:
            duration = scale * abs(value - start) / velocity
            self._motion = asyncio.create_task(self._move(f, start, float(value), duration,
                                                          velocity))
        else:
            await self._arrive(f, float(value), velocity)
        return value

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
        await self.parent.update_stage_health()

    async def _readback(self, position: float) -> None:
        f = self.motor.field_inst
        await _post(f.user_readback_value, position)
        await _post(f.dial_readback_value, position)

    @motor.fields.stop.putter
    async def motor(fields, instance, value):
        axis = fields.parent.group
        if value and axis._motion is not None:
            position = axis._halt()
            await fields.parent.write(position, verify_value=False)
            await axis._arrive(fields, position)
        return 0

    @motor.fields.user_low_limit.putter
    async def motor(fields, instance, value):
        return await fields.parent.group._set_limit(fields, lo=value)

    @motor.fields.user_high_limit.putter
    async def motor(fields, instance, value):
        return await fields.parent.group._set_limit(fields, hi=value)

    async def _set_limit(self, fields, lo: float | None = None, hi: float | None = None):
        """Narrow the soft limits within the stage travel (z never below z_min)."""
        travel = self.engine.limits(self.axis)
        new_lo = fields.user_low_limit.value if lo is None else lo
        new_hi = fields.user_high_limit.value if hi is None else hi
        if not travel[0] <= new_lo < new_hi <= travel[1]:
            raise NvmriError(f"stage {self.axis}: soft limits [{new_lo}, {new_hi}] nm must lie "
                             f"within the travel [{travel[0]}, {travel[1]}] nm")
        await fields.parent.write_metadata(lower_ctrl_limit=new_lo, upper_ctrl_limit=new_hi)
        return new_lo if lo is not None else new_hi


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
        self.source.freq_hz = float(value)
        await _post(self.freq_rbv, value)

    @power.putter
    async def power(self, instance, value):
        self.source.power_dbm = float(value)
        await _post(self.power_rbv, value)

    @output.putter
    async def output(self, instance, value):
        self.source.on = value == "On"
        await _post(self.output_rbv, value)


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
    status = pvproperty(name="PG:STATUS", value="Idle", dtype=ChannelType.ENUM,
                        enum_strings=("Idle", "Acquiring", "Error"), read_only=True)
    shots = pvproperty(name="PG:SHOTS", value=1000, lower_ctrl_limit=1,
                       upper_ctrl_limit=2**31 - 1, doc="shots per gate per acquisition")
    acquire = pvproperty(name="PG:ACQUIRE", value=0,
                         doc="put 1 with completion; completes when the counts are posted")
    counts = pvproperty(name="CNT:COUNTS", value=[0.0], max_length=MAX_GATES,
                        read_only=True, units="counts", doc="per-gate counts")
    acq_id = pvproperty(name="CNT:ACQ_ID", value=0, read_only=True)
    laser_ok = pvproperty(name="HEALTH:LASER_OK", value="OK", dtype=ChannelType.ENUM,
                          enum_strings=_HEALTH, read_only=True)
    stage_ok = pvproperty(name="HEALTH:STAGE_OK", value="OK", dtype=ChannelType.ENUM,
                          enum_strings=_HEALTH, read_only=True)

    def __init__(self, *args, engine: Engine, **kwargs):
        self.engine = engine
        self.time_scale = engine.time_scale
        self.context = None            # the caproto Context, set by serve()
        self._lock = asyncio.Lock()
        super().__init__(*args, **kwargs)

    @shots.startup
    async def shots(self, instance, async_lib):
        await instance.write(self.engine.shots)

    @shots.putter
    async def shots(self, instance, value):
        self.engine.shots = int(value)

    @program.putter
    async def program(self, instance, value):
        try:
            loaded = Program.from_json(value)
            if len(loaded.gates) > MAX_GATES:
                raise NvmriError(f"{len(loaded.gates)} gates; the counter holds {MAX_GATES}")
            self.engine.load(loaded)
        except NvmriError as exc:
            await self._error(f"program refused: {exc}")
            raise
        await self.gates.write(json.dumps(loaded.gate_names))
        await self.message.write("OK")
        if self.status.value != "Idle":
            await self.status.write("Idle")

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
            counts = engine.acquire()
            if wait:
                await asyncio.sleep(wait)
            # IOC-owned outputs: no put-side checks (the putter of PG:ACQUIRE writes them)
            await self.counts.write(counts, verify_value=False)
            await self.acq_id.write(engine.acquisitions, verify_value=False)
            if self.status.value != "Idle":
                await self.status.write("Idle")
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
    """Keep expected refusals (NvmriError, limit violations) out of the IOC's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NvmriError) or type(exc).__name__ == "CannotExceedLimits")


def make_ioc(scenario: Scenario | str | None = None, prefix: str = "NVMRI:",
             time_scale: float = 0.0) -> NvmriIOC:
    """Build the IOC over a fresh :class:`Engine` (not yet serving)."""
    return NvmriIOC(prefix=prefix, engine=Engine(scenario, time_scale=time_scale))


def serve(scenario: Scenario | str | None = None, prefix: str = "NVMRI:",
          time_scale: float = 0.0, port: int | None = None) -> None:
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
    """
    if port is not None:
        os.environ["EPICS_CA_SERVER_PORT"] = os.environ["EPICS_CAS_SERVER_PORT"] = str(port)
    logging.getLogger("caproto").addFilter(_DropRefusals())
    for name in ("caproto.ctx", "caproto.circ"):
        logging.getLogger(name).addFilter(_DropRefusals())
    ioc = make_ioc(scenario, prefix, time_scale)
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

        await ctx.run(startup_hook=ready)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


def pv_names(prefix: str = "NVMRI:") -> list[str]:
    """Every PV the IOC serves (motor records listed by record name)."""
    ioc = NvmriIOC(prefix=prefix, engine=Engine("paper-fig2"))
    return list(ioc.pvdb)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nvmri_bluesky.sim.ioc``: serve the simulated instrument."""
    parser = argparse.ArgumentParser(prog="nvmri-sim-ioc", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="default",
                        help=f"built-in name ({', '.join(list_scenarios())}) or a "
                             ".json/.yaml file")
    parser.add_argument("--prefix", default="NVMRI:", help="PV prefix (default NVMRI:)")
    parser.add_argument("--time-scale", type=float, default=0.0,
                        help="wall seconds per simulated second (default 0: instant)")
    parser.add_argument("--port", type=int, default=None, help="CA server port")
    parser.add_argument("--list-pvs", action="store_true", help="print the PV names and exit")
    args = parser.parse_args(argv)
    try:
        if args.time_scale < 0:
            raise NvmriError(f"--time-scale must be >= 0, got {args.time_scale}")
        if args.list_pvs:
            print("\n".join(pv_names(args.prefix)))
            return 0
        serve(load_scenario(args.scenario), args.prefix, args.time_scale, args.port)
    except NvmriError as exc:
        print(f"nvmri sim-ioc: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

