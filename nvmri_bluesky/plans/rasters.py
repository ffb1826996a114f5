"""Tip rasters: Ramsey fringes, CW-ESR slices, locked DEER maps and PSF maps.

Every raster is a :func:`bluesky.plans.grid_scan` over the stage (slowest axis
first: z, y, x), so it inherits bluesky's grid metadata, snaking and a
checkpoint before every move: a pause never splits a point.  Locked rasters
replace the per-step reading with a locked acquisition
(:func:`~nvmri_bluesky.plans.lock.locked_acquire`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import bluesky.plans as bp

from nvmri_bluesky import physics
from nvmri_bluesky.plans import pulses
from nvmri_bluesky.plans.checks import Axis, check_frequency, check_grid, check_positive
from nvmri_bluesky.plans.deer import DeerReadout, deer_program
from nvmri_bluesky.plans.lock import (
    TAU_CW_S,
    FrequencyLock,
    Predictor,
    lock_program,
    locked_acquire,
)
from nvmri_bluesky.plans.metadata import run_metadata
from nvmri_bluesky.plans.stubs import move_and_tune, prepare, record, retract, set_frequency

F_NV_START_HZ = 6.233e9
"""Where locks look for the ms=0->+1 line first unless told (0.12 T), Hz."""


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


def _locked_step(devices: Any, locks: Sequence[tuple[FrequencyLock, Predictor]],
                 program: pulses.Program, readout: DeerReadout | None,
                 readings: Sequence[Any]) -> Callable:
    """A grid_scan ``per_step``: move, lock every transition, record one event.

    The MW source is tuned to the first lock's prediction while the stage
    moves (one wait for both).
    """
    stage = devices.stage

    def per_step(detectors, step, pos_cache):
        position = [step.get(m, pos_cache[m]) for m in (stage.x, stage.y, stage.z)]
        predicted = [predictor(position) for _, predictor in locks]
        yield from move_and_tune(step, pos_cache, devices.mw, predicted[0])
        for i, (lock, predictor) in enumerate(locks):
            counts = yield from locked_acquire(devices, lock, program, predicted[i],
                                               tuned=i == 0)
            predictor.add(position, lock.frequency.get())
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
    check_positive(shots=shots)
    check_frequency(devices.mw, mw_frequency_hz, "mw_frequency_hz")
    # A PSF map records the lock's estimate itself: any fine estimate (inside the
    # pair's capture range) is a measurement; the MW need not sit on the line.
    plus = FrequencyLock(name="lock", tolerance_hz=0.5 / TAU_CW_S)
    minus = FrequencyLock(name="lock_minus", tolerance_hz=0.5 / TAU_CW_S)
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
        yield from locked_acquire(devices, lock, program, start_hz)
        references[key] = lock.frequency.get()
    per_step = _locked_step(devices, [(plus, Predictor(references["f_nv0_hz"])),
                                      (minus, Predictor(references["f_minus0_hz"]))],
                            program, None, [*motors, devices.counter, plus, minus])
    references["f_minus0_hz"] *= -1 if references["f_nv0_hz"] > 2 * physics.D_ZFS else 1
    _md = run_metadata(devices, "psf_map", dict(x=x, y=y, z=z, mw_frequency_hz=mw_frequency_hz,
                                                shots=shots, snake=snake),
                       programs=[program], grid=grid, md={**references, **(md or {})})
    return (yield from bp.grid_scan([devices.counter, plus, minus], *args,
                                    snake_axes=snake, per_step=per_step, md=_md))


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
               tau_cw_s: float = 120e-9, shots: int = 300_000, snake: bool = False,
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
