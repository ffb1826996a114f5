"""One-dimensional measurements at a fixed tip position.

ODMR (MW frequency), Rabi / Ramsey / echo (pulse timing), and the dark-spin
DEER spectrum (RF frequency) and DEER evolution (free time) with the tip
retracted.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp

from nvmri_bluesky import pulses
from nvmri_bluesky.plans.checks import (
    check_frequency,
    check_positive,
    check_values_positive,
)
from nvmri_bluesky.plans.deer import DeerReadout, deer_program
from nvmri_bluesky.plans.lock import FrequencyLock, locked_acquire
from nvmri_bluesky.plans.metadata import run_metadata
from nvmri_bluesky.plans.rasters import F_NV_START_HZ
from nvmri_bluesky.plans.stubs import (
    UnitSignal,
    load_program,
    prepare,
    record,
    retract,
    set_frequency,
)


def odmr_sweep(devices: Any, start_hz: float, stop_hz: float, num: int,
               shots: int = 100_000, md: dict | None = None) -> Generator[Any, Any, str]:
    """CW ODMR: sweep the MW carrier and count (a reference gate far off resonance).

    Parameters
    ----------
    devices
        The instrument.
    start_hz, stop_hz : float
        MW sweep range, Hz.
    num : int
        Number of frequencies.
    shots : int
        Shots per gate and point.
    md : dict, optional

    Yields
    ------
    Msg
    """
    check_positive(num=num, shots=shots)
    for name, f in (("start_hz", start_hz), ("stop_hz", stop_hz)):
        check_frequency(devices.mw, f, name)
    program = pulses.cw_odmr((0.0, 200e6))
    _md = run_metadata(devices, "odmr_sweep", dict(start_hz=start_hz, stop_hz=stop_hz, num=num,
                                                   shots=shots), programs=[program], md=md)
    yield from prepare(devices, program, shots, mw_on=True, rf_on=False)
    return (yield from bp.scan([devices.counter], devices.mw.frequency, start_hz, stop_hz, num,
                               md=_md))


def _timing_sweep(devices: Any, plan_name: str, parameter: str, values: Sequence[float],
                  build: Callable[[float], pulses.Program], mw_frequency_hz: float, shots: int,
                  extra_args: dict, md: dict | None) -> Generator[Any, Any, str]:
    """Sweep a pulse-timing parameter: one program per value, one event per value."""
    check_values_positive(parameter, values)
    check_positive(shots=shots)
    check_frequency(devices.mw, mw_frequency_hz, "mw_frequency_hz")
    value = UnitSignal(name=parameter, value=float(values[0]), units="s")
    programs = [build(v) for v in values]
    _md = run_metadata(devices, plan_name, dict(values=list(values), shots=shots,
                                                mw_frequency_hz=mw_frequency_hz, **extra_args),
                       programs=programs[:1], md=md)
    _md["programs"] = {f"{p.name}[{i}]": p.to_dict() for i, p in enumerate(programs)}

    @bpp.run_decorator(md=_md)
    def inner():
        yield from set_frequency(devices.mw, mw_frequency_hz)
        for v, program in zip(values, programs, strict=True):
            yield from bps.checkpoint()
            yield from load_program(devices.pulser, program)
            yield from bps.mv(value, float(v))
            yield from bps.trigger_and_read([devices.counter, value])

    yield from prepare(devices, programs[0], shots, mw_on=True, rf_on=False)
    return (yield from inner())


def rabi(devices: Any, durations_s: Sequence[float], mw_frequency_hz: float,
         shots: int = 100_000, md: dict | None = None) -> Generator[Any, Any, str]:
    """Rabi oscillation: one MW pulse of growing length (references included).

    Parameters
    ----------
    devices
        The instrument.
    durations_s : sequence of float
        MW pulse lengths, s.
    mw_frequency_hz : float
        MW carrier (on the NV line), Hz.
    shots : int
    md : dict, optional

    Yields
    ------
    Msg
    """
    return (yield from _timing_sweep(devices, "rabi", "mw_duration", durations_s,
                                     lambda t: pulses.rabi(duration=t, references=True),
                                     mw_frequency_hz, shots, {}, md))


def ramsey(devices: Any, taus_s: Sequence[float], mw_frequency_hz: float,
           detuning_hz: float = 2e6, shots: int = 100_000,
           md: dict | None = None) -> Generator[Any, Any, str]:
    """Ramsey fringes in time: pi/2 - tau - pi/2 with the MW deliberately detuned.

    Parameters
    ----------
    devices
        The instrument.
    taus_s : sequence of float
        Free times, s.
    mw_frequency_hz : float
        MW carrier, Hz.
    detuning_hz : float
        Sideband detuning of the pulses from the carrier, Hz.
    shots : int
    md : dict, optional

    Yields
    ------
    Msg
    """
    return (yield from _timing_sweep(
        devices, "ramsey", "tau", taus_s,
        lambda t: pulses.ramsey(tau=t, detuning=detuning_hz, references=True),
        mw_frequency_hz, shots, {"detuning_hz": detuning_hz}, md))


def echo(devices: Any, taus_s: Sequence[float], mw_frequency_hz: float,
         shots: int = 100_000, md: dict | None = None) -> Generator[Any, Any, str]:
    """Hahn echo decay: pi/2 - tau/2 - pi - tau/2 - pi/2.

    Parameters
    ----------
    devices
        The instrument.
    taus_s : sequence of float
        Total free times, s.
    mw_frequency_hz : float
        MW carrier, Hz.
    shots : int
    md : dict, optional

    Yields
    ------
    Msg
    """
    return (yield from _timing_sweep(devices, "echo", "tau", taus_s,
                                     lambda t: pulses.echo(tau=t, references=True),
                                     mw_frequency_hz, shots, {}, md))


def _tip_free_deer(devices: Any, plan_name: str, sweep: Any, values: Sequence[float],
                   setup: Callable, tau_s: float, rf_frequency_hz: float,
                   mw_frequency_hz: float, rf_duration_s: float, shots: int,
                   plan_args: dict, md: dict | None) -> Generator[Any, Any, str]:
    """DEER with the tip retracted, one locked point per swept value."""
    check_positive(tau_s=tau_s, rf_duration_s=rf_duration_s, shots=shots)
    check_frequency(devices.rf, rf_frequency_hz, "rf_frequency_hz")
    check_frequency(devices.mw, mw_frequency_hz, "mw_frequency_hz")
    lock, readout = FrequencyLock(), DeerReadout()
    program = deer_program(lock.fwhm_hz, tau_s, rf_duration_s)
    _md = run_metadata(devices, plan_name, plan_args, programs=[program], md=md)

    @bpp.run_decorator(md=_md)
    def inner():
        f_guess = mw_frequency_hz
        for v in values:
            yield from bps.checkpoint()
            active = yield from setup(v, program)
            counts = yield from locked_acquire(devices, lock, active, f_guess)
            f_guess = lock.frequency.get()
            readout.update(counts)
            yield from record((sweep, devices.counter, lock, readout))

    yield from retract(devices.stage)
    yield from prepare(devices, program, shots, mw_on=True, rf_on=True)
    yield from set_frequency(devices.rf, rf_frequency_hz)
    return (yield from bpp.stage_wrapper(inner(), [devices.counter]))


def deer_spectrum(devices: Any, rf_start_hz: float, rf_stop_hz: float, num: int,
                  tau_s: float = 10e-6, mw_frequency_hz: float = F_NV_START_HZ,
                  rf_duration_s: float = 100e-9, shots: int = 300_000,
                  md: dict | None = None) -> Generator[Any, Any, str]:
    """The dark-spin ESR line: DEER contrast vs RF frequency, tip retracted.

    Parameters
    ----------
    devices
        The instrument.
    rf_start_hz, rf_stop_hz : float
        RF sweep, Hz.
    num : int
    tau_s : float
        DEER free time, s.
    mw_frequency_hz : float
        Where the NV line is looked for, Hz.
    rf_duration_s : float
        RF pi-pulse length, s.
    shots : int
    md : dict, optional

    Yields
    ------
    Msg
    """
    check_positive(num=num)
    for name, f in (("rf_start_hz", rf_start_hz), ("rf_stop_hz", rf_stop_hz)):
        check_frequency(devices.rf, f, name)
    step = (rf_stop_hz - rf_start_hz) / max(num - 1, 1)
    values = [rf_start_hz + i * step for i in range(num)]

    def setup(f, program):
        yield from set_frequency(devices.rf, f)
        return program

    return (yield from _tip_free_deer(
        devices, "deer_spectrum", devices.rf.frequency, values, setup, tau_s, rf_start_hz,
        mw_frequency_hz, rf_duration_s, shots,
        dict(rf_start_hz=rf_start_hz, rf_stop_hz=rf_stop_hz, num=num, tau_s=tau_s,
             mw_frequency_hz=mw_frequency_hz, rf_duration_s=rf_duration_s, shots=shots), md))


def deer_evolution(devices: Any, taus_s: Sequence[float], rf_frequency_hz: float,
                   mw_frequency_hz: float = F_NV_START_HZ, rf_duration_s: float = 100e-9,
                   shots: int = 300_000, md: dict | None = None) -> Generator[Any, Any, str]:
    """DEER vs free time with the tip retracted: the NV-dark-spin couplings.

    A single coherently coupled spin-1/2 gives cos(pi nu tau); a bath decays.

    Parameters
    ----------
    devices
        The instrument.
    taus_s : sequence of float
        Total free times, s.
    rf_frequency_hz : float
        RF on the tip-free dark-spin line, Hz.
    mw_frequency_hz : float
    rf_duration_s : float
    shots : int
    md : dict, optional

    Yields
    ------
    Msg
    """
    check_values_positive("taus_s", taus_s)
    tau = UnitSignal(name="tau", value=float(taus_s[0]), units="s")
    lock_fwhm = FrequencyLock().fwhm_hz

    def setup(t, _program):
        program = deer_program(lock_fwhm, t, rf_duration_s)
        yield from load_program(devices.pulser, program)
        yield from bps.mv(tau, float(t))
        return program

    return (yield from _tip_free_deer(
        devices, "deer_evolution", tau, taus_s, setup, float(taus_s[0]), rf_frequency_hz,
        mw_frequency_hz, rf_duration_s, shots,
        dict(taus_s=list(taus_s), rf_frequency_hz=rf_frequency_hz,
             mw_frequency_hz=mw_frequency_hz, rf_duration_s=rf_duration_s, shots=shots), md))
