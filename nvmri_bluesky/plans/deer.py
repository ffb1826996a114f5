"""DEER readout: the derived quantities of one acquisition, as soft readings."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

import bluesky.preprocessors as bpp
import numpy as np
from ophyd import Component as Cpt
from ophyd import Device

from nvmri_bluesky import physics, pulses
from nvmri_bluesky.plans.lock import FrequencyLock, locked_acquire
from nvmri_bluesky.plans.metadata import run_metadata
from nvmri_bluesky.plans.stubs import UnitSignal, prepare, record, set_frequency


class DeerReadout(Device):
    """DEER contrast (E - S)/E and the normalised populations of one point.

    Computed from the gates ``signal``, ``echo``, ``bright``, ``dark`` of the
    same acquisition, so laser and collection drifts cancel point by point.
    """

    contrast = Cpt(UnitSignal, value=np.nan, units="", kind="hinted")
    p0_signal = Cpt(UnitSignal, value=np.nan, units="", kind="normal")
    p0_echo = Cpt(UnitSignal, value=np.nan, units="", kind="normal")

    def __init__(self, *args: Any, name: str = "deer", **kwargs: Any) -> None:
        super().__init__(*args, name=name, **kwargs)

    def update(self, counts: Mapping[str, float]) -> None:
        """Derive the readings from one acquisition's gate counts."""
        b, d = counts["bright"], counts["dark"]
        self.p0_signal.put(float(physics.normalised_population(counts["signal"], b, d)))
        self.p0_echo.put(float(physics.normalised_population(counts["echo"], b, d)))
        self.contrast.put(float(physics.deer_contrast(counts["signal"], counts["echo"], b, d)))


def deer_program(fwhm_hz: float, tau_s: float, rf_duration_s: float) -> pulses.Program:
    """The per-point DEER program with its references and the lock gates."""
    from nvmri_bluesky.plans.lock import LOCK_WINDOW_S, lock_detunings

    return pulses.deer(tau=tau_s, rf_duration=rf_duration_s, references=True,
                       lock_detunings=lock_detunings(fwhm_hz), lock_window=LOCK_WINDOW_S)


def deer_point(devices: Any, rf_frequency_hz: float, tau_s: float = 10e-6,
               mw_frequency_hz: float = 6.233e9, rf_duration_s: float = 100e-9,
               shots: int = 300_000, md: dict | None = None) -> Generator[Any, Any, str]:
    """Lock the MW source at the current tip position and take one DEER point.

    Parameters
    ----------
    devices
        The instrument (``stage``, ``mw``, ``rf``, ``pulser``, ``counter``).
    rf_frequency_hz : float
        RF carrier for the dark spins, Hz.
    tau_s : float
        Total DEER free-evolution time, s.
    mw_frequency_hz : float
        Where to start looking for the NV line, Hz.
    rf_duration_s : float
        RF pi-pulse length, s.
    shots : int
        Shots per gate.
    md : dict, optional
        Extra start-document metadata.

    Yields
    ------
    Msg
    """
    from nvmri_bluesky.plans.checks import check_frequency, check_positive

    check_positive(tau_s=tau_s, rf_duration_s=rf_duration_s, shots=shots)
    check_frequency(devices.rf, rf_frequency_hz, "rf_frequency_hz")
    check_frequency(devices.mw, mw_frequency_hz, "mw_frequency_hz")
    lock, readout = FrequencyLock(), DeerReadout()
    program = deer_program(lock.fwhm_hz, tau_s, rf_duration_s)
    motors = [devices.stage.x, devices.stage.y, devices.stage.z]
    _md = run_metadata(devices, "deer_point", dict(rf_frequency_hz=rf_frequency_hz, tau_s=tau_s,
                       mw_frequency_hz=mw_frequency_hz, rf_duration_s=rf_duration_s,
                       shots=shots), programs=[program], md=md)

    @bpp.run_decorator(md=_md)
    def inner():
        yield from prepare(devices, program, shots, mw_on=True, rf_on=True)
        yield from set_frequency(devices.rf, rf_frequency_hz)
        counts = yield from locked_acquire(devices, lock, program, mw_frequency_hz)
        readout.update(counts)
        yield from record((*motors, devices.counter, lock, readout))

    return (yield from inner())
