"""Tip rasters: Ramsey fringes, CW-ESR slices, locked DEER maps and PSF maps.

Every raster is a :func:`bluesky.plans.grid_scan` over the stage (slowest axis
first: z, y, x), so it inherits bluesky's grid metadata, snaking and a
checkpoint before every move: a pause never splits a point.  Locked rasters
replace the per-step reading with a locked acquisition
(:func:`~nvmri_bluesky.plans.lock.locked_acquire`); a lock that cannot follow
raises :class:`~nvmri_bluesky.plans.lock.LockLost` naming the tip position.
A PSF map is measured from high to low apex and stops descending where the
lock could not follow (:class:`Descent`): its stop document says where and why.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import bluesky.plans as bp
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import Msg

from nvmri_bluesky import physics, pulses
from nvmri_bluesky.plans.checks import Axis, check_frequency, check_grid, check_positive
from nvmri_bluesky.plans.deer import DeerReadout, deer_program
from nvmri_bluesky.plans.lock import (
    LOCK_REACH_HZ,
    FrequencyLock,
    LockLost,
    Predictor,
    lock_program,
    locked_acquire,
    next_plane_miss_hz,
)
from nvmri_bluesky.plans.metadata import run_metadata
from nvmri_bluesky.plans.stubs import move_and_tune, prepare, record, retract, set_frequency

F_NV_START_HZ = 6.233e9
"""Where locks look for the ms=0->+1 line first unless told (0.12 T), Hz."""
APPROACH_TOP_NM = 60.0
APPROACH_STEP_NM = 8.0
"""A PSF map's first point is approached from this apex height down in these steps, nm."""


def _axes(x: Axis, y: Axis, z: Axis | float) -> dict[str, Axis]:
    z_axis = (float(z), float(z), 1) if isinstance(z, int | float) else tuple(z)
    return {"z": z_axis, "y": tuple(y), "x": tuple(x)}


def _grid(stage: Any, axes: dict[str, Axis], snake: bool) -> tuple[list, dict]:
    """grid_scan arguments (slowest first) and the start document's ``grid``."""
    args: list = []
    for name, (start, stop, num) in axes.items():
        args += [getattr(stage, name), start, stop, num]
    grid = {"shape": [a[2] for a in axes.values()],
            "axes": [getattr(stage, n).name for n in axes],
            "extents": [[a[0], a[1]] for a in axes.values()],
            "snake": bool(snake), "units": "nm"}
    return args, grid


class Descent:
    """Where a PSF map measured top down stops descending, and why.

    Keeps the worst prediction miss of every plane (apex height) measured;
    a new plane is measured only if the misses extrapolated to it
    (:func:`~nvmri_bluesky.plans.lock.next_plane_miss_hz`) are within the
    lock's reach.  A lock lost on a plane ends the descent there (the plane
    is incomplete).  A single-plane map (a line) cannot descend: a point
    where the lock cannot follow is left out and the next one is tried.
    :attr:`reason` says where and why.

    Parameters
    ----------
    planes : int
        Planes of the map.
    reach_hz : float
        Largest prediction miss the lock recovers from, Hz.
    """

    def __init__(self, planes: int, reach_hz: float = LOCK_REACH_HZ) -> None:
        self.planes = planes
        self.reach_hz = reach_hz
        self.misses: dict[float, float] = {}
        self.gaps: list[str] = []
        self.stopped: str | None = None

    @property
    def reason(self) -> str | None:
        """Why the map is not complete (None if it is)."""
        if self.stopped is not None:
            return self.stopped
        if self.gaps:
            return (f"{len(self.gaps)} point(s) left out where the lock could not follow, "
                    f"the first: {self.gaps[0]}")
        return None

    def allows(self, z_nm: float) -> bool:
        """Whether the point at apex ``z_nm`` is to be measured (opens a new plane)."""
        if self.stopped is not None:
            return False
        if z_nm not in self.misses:
            expected = next_plane_miss_hz(list(self.misses.values()))
            if expected > self.reach_hz:
                self._stop(z_nm, f"the planes above predict prediction misses of "
                                 f"{expected / 1e6:.0f} MHz there, beyond the lock's reach "
                                 f"(+/-{self.reach_hz / 1e6:.0f} MHz)")
                return False
            self.misses[z_nm] = 0.0
        return True

    def record(self, z_nm: float, miss_hz: float) -> None:
        """Note a locked point's |predicted - locked| frequency, Hz."""
        self.misses[z_nm] = max(self.misses[z_nm], abs(float(miss_hz)))

    def lost(self, z_nm: float, error: LockLost) -> None:
        """The lock could not follow at a point of plane ``z_nm``."""
        if self.planes == 1:
            self.gaps.append(str(error))
            return
        self.misses.pop(z_nm, None)
        self._stop(z_nm, str(error))

    def _stop(self, z_nm: float, why: str) -> None:
        done = sorted(self.misses)
        covers = (f"the map covers apex {done[0]:g}..{done[-1]:g} nm" if done
                  else "no plane is complete")
        self.stopped = f"map stopped at apex {z_nm:g} nm: {why}; {covers}"

    def closing(self, msg: Msg) -> Msg:
        """A ``msg_mutator`` function: the run's close_run carries :attr:`reason`."""
        if msg.command == "close_run" and self.reason and not msg.kwargs.get("reason"):
            return msg._replace(kwargs={**msg.kwargs, "reason": self.reason})
        return msg


def _where(lock: FrequencyLock, position: Sequence[float], error: LockLost) -> LockLost:
    x, y, z = position
    return LockLost(f"{lock.name} at tip ({x:.2f}, {y:.2f}, {z:.2f}) nm: {error}")


def _locked_step(devices: Any, locks: Sequence[tuple[FrequencyLock, Predictor]],
                 program: pulses.Program, readout: DeerReadout | None,
                 readings: Sequence[Any], descent: Descent | None = None) -> Callable:
    """A grid_scan ``per_step``: move, lock every transition, record one event.

    The MW source is tuned to the first lock's prediction while the stage
    moves (one wait for both).  With a ``descent``, points below where it
    stopped are skipped and a lost lock stops it; without, a lost lock
    raises :class:`LockLost` with the tip position.
    """
    stage = devices.stage

    def per_step(detectors, step, pos_cache):
        position = [step.get(m, pos_cache[m]) for m in (stage.x, stage.y, stage.z)]
        if descent is not None and not descent.allows(position[2]):
            return
        predicted = [predictor(position) for _, predictor in locks]
        yield from move_and_tune(step, pos_cache, devices.mw, predicted[0])
        miss = 0.0
        for i, (lock, predictor) in enumerate(locks):
            try:
                counts = yield from locked_acquire(devices, lock, program, predicted[i],
                                                   tuned=i == 0)
            except LockLost as error:
                if descent is None:
                    raise _where(lock, position, error) from error
                descent.lost(position[2], _where(lock, position, error))
                return
            predictor.add(position, lock.frequency.get())
            miss = max(miss, abs(lock.frequency.get() - predicted[i]))
        if descent is not None:
            descent.record(position[2], miss)
        if readout is not None:
            readout.update(counts)
        yield from record(readings)

    return per_step


def deer_raster(devices: Any, x: Axis, y: Axis, z: Axis | float, rf_frequency_hz: float,
                tau_s: float = 10e-6, mw_frequency_hz: float = F_NV_START_HZ,
                rf_duration_s: float = 100e-9, shots: int = 300_000, snake: bool = True,
                md: dict | None = None) -> Generator[Any, Any, str]:
    """DEER over a 2D or 3D tip grid with the MW source locked at every point.

    Parameters
    ----------
    devices
        The instrument (``stage``, ``mw``, ``rf``, ``pulser``, ``counter``).
    x, y : (start, stop, num)
        Lateral tip axes, nm.
    z : (start, stop, num) or float
        Apex heights above the surface, nm (a single height for a 2D map).
    rf_frequency_hz : float
        RF carrier: sets which resonant slice is imaged, Hz.
    tau_s : float
        Total DEER free-evolution time, s.
    mw_frequency_hz : float
        Where the lock looks for the NV line at the first point, Hz.
    rf_duration_s : float
        RF pi-pulse length, s.
    shots : int
        Shots per gate and point.
    snake : bool
        Snake the fast axes.
    md : dict, optional

    Yields
    ------
    Msg
    """
    axes = check_grid(devices.stage, _axes(x, y, z))
    check_positive(tau_s=tau_s, rf_duration_s=rf_duration_s, shots=shots)
    check_frequency(devices.rf, rf_frequency_hz, "rf_frequency_hz")
    check_frequency(devices.mw, mw_frequency_hz, "mw_frequency_hz")
    lock, readout = FrequencyLock(), DeerReadout()
    program = deer_program(lock.fwhm_hz, tau_s, rf_duration_s)
    args, grid = _grid(devices.stage, axes, snake)
    motors = [devices.stage.x, devices.stage.y, devices.stage.z]
    per_step = _locked_step(devices, [(lock, Predictor(mw_frequency_hz))], program, readout,
                            [*motors, devices.counter, lock, readout])
    _md = run_metadata(devices, "deer_raster", dict(
        x=x, y=y, z=z, rf_frequency_hz=rf_frequency_hz, tau_s=tau_s,
        mw_frequency_hz=mw_frequency_hz, rf_duration_s=rf_duration_s, shots=shots, snake=snake),
        programs=[program], grid=grid, md=md)
    yield from prepare(devices, program, shots, mw_on=True, rf_on=True)
    yield from set_frequency(devices.rf, rf_frequency_hz)
    return (yield from bp.grid_scan([devices.counter, lock, readout], *args,
                                    snake_axes=snake, per_step=per_step, md=_md))


def psf_map(devices: Any, x: Axis, y: Axis, z: Axis | float,
            mw_frequency_hz: float = F_NV_START_HZ, shots: int = 300_000, snake: bool = True,
            md: dict | None = None) -> Generator[Any, Any, str]:
    """Lock both NV transitions over a tip grid: the vector field map behind the PSF.

    The ms=0->+1 and ms=0->-1 frequencies at every point give the tip field
    along and across the NV axis exactly (:func:`physics.field_from_transitions`),
    hence the dark spins' detuning map: the PSF without a tip model.

    The lock follows the line down to the first point (:func:`_approach`);
    the planes are measured from the highest apex down, each predicted from
    the ones above.  The map stops descending before a plane where the
    misses of the planes above, extrapolated, exceed the lock's reach, or on
    the plane where the lock could not follow (:class:`Descent`): the run
    then ends with the planes above and a stop document whose reason says
    where and why (the reconstruction uses the complete planes).

    Parameters
    ----------
    devices
        The instrument.
    x, y : (start, stop, num)
        Lateral tip axes, nm.
    z : (start, stop, num) or float
        Apex heights, nm.
    mw_frequency_hz : float
        Where to look for the ms=0->+1 line first, Hz; the ms=0->-1 search
        starts at |f+ - 2D| (above the level anticrossing).
    shots : int
        Shots per gate and point.
    snake : bool
    md : dict, optional

    Yields
    ------
    Msg
    """
    axes = check_grid(devices.stage, _axes(x, y, z))
    z_lo, z_hi = sorted(axes["z"][:2])
    axes["z"] = (z_hi, z_lo, axes["z"][2])                     # top down
    check_positive(shots=shots)
    check_frequency(devices.mw, mw_frequency_hz, "mw_frequency_hz")
    # A PSF map records the lock's estimate itself: any fine estimate (inside the
    # pair's capture range) is a measurement; the MW need not sit on the line.
    plus = FrequencyLock(name="lock", tolerance_hz=0.3 / physics.TAU_CW_S)
    minus = FrequencyLock(name="lock_minus", tolerance_hz=0.3 / physics.TAU_CW_S)
    program = lock_program(plus.fwhm_hz)
    args, grid = _grid(devices.stage, axes, snake)
    motors = [devices.stage.x, devices.stage.y, devices.stage.z]
    f_minus = abs(mw_frequency_hz - 2 * physics.D_ZFS)
    check_frequency(devices.mw, f_minus, "ms=0->-1 search frequency")
    yield from prepare(devices, program, shots, mw_on=True, rf_on=False)
    yield from retract(devices.stage)
    references = {}
    for lock, start_hz, key in ((plus, mw_frequency_hz, "f_nv0_hz"),
                                (minus, f_minus, "f_minus0_hz")):
        try:
            yield from locked_acquire(devices, lock, program, start_hz)
        except LockLost as error:
            raise LockLost(f"{lock.name} with the tip retracted: {error}") from error
        references[key] = lock.frequency.get()
    locks = [(plus, Predictor(references["f_nv0_hz"])),
             (minus, Predictor(references["f_minus0_hz"]))]
    yield from _approach(devices, locks, program,
                         (axes["x"][0], axes["y"][0], axes["z"][0]))
    descent = Descent(planes=axes["z"][2])
    per_step = _locked_step(devices, locks, program, None,
                            [*motors, devices.counter, plus, minus], descent)
    references["f_minus0_hz"] *= -1 if references["f_nv0_hz"] > 2 * physics.D_ZFS else 1
    _md = run_metadata(devices, "psf_map", dict(x=x, y=y, z=z, mw_frequency_hz=mw_frequency_hz,
                                                shots=shots, snake=snake),
                       programs=[program], grid=grid, md={**references, **(md or {})})
    return (yield from bpp.msg_mutator(
        bp.grid_scan([devices.counter, plus, minus], *args, snake_axes=snake,
                     per_step=per_step, md=_md), descent.closing))


def approach_heights(z_first_nm: float, top_nm: float = APPROACH_TOP_NM,
                     step_nm: float = APPROACH_STEP_NM) -> list[float]:
    """Apex heights of the approach to a map's first point, highest first, nm.

    Uniform steps of ``step_nm`` above ``z_first_nm`` up to ``top_nm`` (none if
    the first point is within a step of it), so that the predictor reaches the
    first point by linear extrapolation along z.
    """
    n = int(np.floor((top_nm - z_first_nm) / step_nm + 1e-9))
    return [float(z_first_nm + k * step_nm) for k in range(n, 0, -1)]


def _approach(devices: Any, locks: Sequence[tuple[FrequencyLock, Predictor]],
              program: pulses.Program, first: Sequence[float]) -> Generator[Any, Any, None]:
    """Lock every transition on the way down to a map's first point (no events).

    From the retracted tip the line at a low first point can be shifted beyond
    the lock's reach; locked points straight above it (:func:`approach_heights`)
    let the predictor follow it down.
    """
    stage = devices.stage
    x0, y0, z0 = (float(v) for v in first)
    cache = dict.fromkeys((stage.x, stage.y, stage.z))
    for z in approach_heights(z0, top_nm=min(APPROACH_TOP_NM, stage.z.limits[1])):
        position = [x0, y0, z]
        predicted = [predictor(position) for _, predictor in locks]
        yield from move_and_tune({stage.x: x0, stage.y: y0, stage.z: z}, cache, devices.mw,
                                 predicted[0])
        for i, (lock, predictor) in enumerate(locks):
            try:
                yield from locked_acquire(devices, lock, program, predicted[i], tuned=i == 0)
            except LockLost as error:
                raise _where(lock, position, error) from error
            predictor.add(position, lock.frequency.get())


def _fixed_mw_raster(devices: Any, plan_name: str, program: pulses.Program, x: Axis, y: Axis,
                     z: Axis | float, mw_frequency_hz: float, shots: int, snake: bool,
                     plan_args: dict, md: dict | None) -> Generator[Any, Any, str]:
    """A raster at a fixed MW frequency (no lock): the counts map the NV line."""
    axes = check_grid(devices.stage, _axes(x, y, z))
    check_positive(shots=shots)
    check_frequency(devices.mw, mw_frequency_hz, "mw_frequency_hz")
    args, grid = _grid(devices.stage, axes, snake)
    _md = run_metadata(devices, plan_name, plan_args, programs=[program], grid=grid, md=md)
    yield from prepare(devices, program, shots, mw_on=True, rf_on=False)
    yield from set_frequency(devices.mw, mw_frequency_hz)
    return (yield from bp.grid_scan([devices.counter], *args, snake_axes=snake, md=_md))


def ramsey_raster(devices: Any, x: Axis, y: Axis, z: float, mw_frequency_hz: float,
                  tau_s: float = 450e-9, shots: int = 300_000, snake: bool = False,
                  md: dict | None = None) -> Generator[Any, Any, str]:
    """Ramsey interferometry over a lateral tip grid (Fig. 2a fringes).

    The MW source stays at ``mw_frequency_hz``; the tip field detunes the NV
    by f_nv(tip) - f_mw and the Ramsey population oscillates in space with
    period 1/(tau |grad f_nv|).

    Parameters
    ----------
    devices
        The instrument.
    x, y : (start, stop, num)
        Lateral axes, nm (num = 1 on one of them gives a linecut).
    z : float
        Apex height, nm.
    mw_frequency_hz : float
        Fixed MW frequency, Hz.
    tau_s : float
        Ramsey free time, s.
    shots : int
    snake : bool
    md : dict, optional

    Yields
    ------
    Msg
    """
    check_positive(tau_s=tau_s)
    program = pulses.ramsey(tau=tau_s, references=True)
    return (yield from _fixed_mw_raster(
        devices, "ramsey_raster", program, x, y, z, mw_frequency_hz, shots, snake,
        dict(x=x, y=y, z=z, mw_frequency_hz=mw_frequency_hz, tau_s=tau_s, shots=shots,
             snake=snake), md))


def esr_raster(devices: Any, x: Axis, y: Axis, z: Axis | float, mw_frequency_hz: float,
               tau_cw_s: float = physics.TAU_CW_S, shots: int = 300_000, snake: bool = False,
               md: dict | None = None) -> Generator[Any, Any, str]:
    """CW-ESR over a tip grid at a fixed MW frequency (Fig. 2b resonant slice).

    The fluorescence dips where f_nv(tip) = f_mw; the slice is 1/(tau_cw
    |grad f_nv|) wide.

    Parameters
    ----------
    devices
        The instrument.
    x, y : (start, stop, num)
        Lateral axes, nm.
    z : (start, stop, num) or float
        Apex heights, nm.
    mw_frequency_hz : float
        Fixed MW frequency, Hz.
    tau_cw_s : float
        CW inverse linewidth the probe is set for, s (recorded).
    shots : int
    snake : bool
    md : dict, optional

    Yields
    ------
    Msg
    """
    check_positive(tau_cw_s=tau_cw_s)
    program = pulses.cw_odmr((0.0, 25.0 / tau_cw_s), name="esr")
    return (yield from _fixed_mw_raster(
        devices, "esr_raster", program, x, y, z, mw_frequency_hz, shots, snake,
        dict(x=x, y=y, z=z, mw_frequency_hz=mw_frequency_hz, tau_cw_s=tau_cw_s, shots=shots,
             snake=snake), md))
