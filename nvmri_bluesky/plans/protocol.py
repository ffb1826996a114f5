"""The paper's protocol as plans: each step decided from the data just taken.

``calibration`` (Fig. 2), ``dark_spin_line`` (tip-free ESR and coupling),
``single_spins`` (Fig. 4) and ``surface_layers`` (Fig. 3) run the measurement
plans in order and choose the next one's parameters from the previous runs'
data (read from the documents as they are emitted: what the instrument gives,
nothing else).  Each returns ``{measurement: uid}``; the reconstruction then
reads those runs back from the catalog.

Run them from IPython like any plan, e.g. ``uids = RE(calibration(nv))``
returns the uids in ``RE``'s plan return value.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import bluesky.preprocessors as bpp
import numpy as np
import xarray as xr

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans import rasters, sweeps
from nvmri_bluesky.reconstruct import calibration as cal
from nvmri_bluesky.reconstruct.runs import run_dataset


class _Collector:
    """Keeps one run's start, primary events and stop as they are emitted."""

    def __init__(self) -> None:
        self.start: dict | None = None
        self.stop: dict | None = None
        self.events: list[dict] = []
        self._primary: str | None = None

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            self.start, self.events, self._primary = doc, [], None
        elif name == "descriptor" and doc.get("name") == "primary":
            self._primary = doc["uid"]
        elif name == "event" and doc["descriptor"] == self._primary:
            self.events.append(doc)
        elif name == "stop":
            self.stop = doc


def take(plan: Generator) -> Generator[Any, Any, tuple[str, xr.Dataset]]:
    """Run a measurement plan and return (uid, its data as a dataset)."""
    collector = _Collector()
    uid = yield from bpp.subs_wrapper(plan, collector)
    if collector.start is None:
        raise NvmriError("the measurement produced no run")
    return collector.start["uid"], run_dataset(collector.start, collector.events,
                                               collector.stop)


def _line_axis(ds: xr.Dataset, axis: str) -> np.ndarray:
    return ds[axis].values


def calibration(devices: Any, mw_frequency_hz: float = rasters.F_NV_START_HZ,
                ramsey_height_nm: float = 30.0, ramsey_tau_s: float = 450e-9,
                cw_height_nm: float = 10.0, cw_gradient_gauss_per_nm: float = 12.0,
                line_half_nm: float = 60.0, shots: int = 300_000,
                md: dict | None = None) -> Generator[Any, Any, dict[str, str]]:
    """Fig. 2: tip gradient, Ramsey fringe period and CW-ESR slice width.

    1. Two-transition lock line along y through the NV's lateral position
       (x = 0) at ``ramsey_height_nm``: B_par(y) and where its gradient peaks.
    2. Ramsey line (tau = ``ramsey_tau_s``) across that point at the NV
       frequency locked there: the fringes.
    3. Two-transition lock line along x at ``cw_height_nm``: where the field
       gradient is ``cw_gradient_gauss_per_nm``.
    4. CW line across that point at the frequency locked there: the slice.

    Parameters
    ----------
    devices
        The instrument.
    mw_frequency_hz : float
        Where the locks look first, Hz.
    ramsey_height_nm, cw_height_nm : float
        Apex heights of the two pairs of lines, nm.
    ramsey_tau_s : float
        Ramsey free time, s.
    cw_gradient_gauss_per_nm : float
        Field gradient at which the CW slice is measured, G/nm.
    line_half_nm : float
        Half-length of the lock lines, nm.
    shots : int
    md : dict, optional

    Yields
    ------
    Msg

    Returns
    -------
    dict
        measurement name -> run uid.
    """
    uids: dict[str, str] = {}
    n = int(2 * line_half_nm) + 1
    line = (-line_half_nm, line_half_nm, n)
    uids["gradient_line"], grad_line = yield from take(rasters.psf_map(
        devices, x=(0.0, 0.0, 1), y=line, z=ramsey_height_nm, mw_frequency_hz=mw_frequency_hz,
        shots=shots, snake=False, md={"measurement": "gradient_line", **(md or {})}))
    y = grad_line["y"].values
    f_plus = grad_line["lock_frequency"].values.ravel()
    b_par = cal.field_along_axis(f_plus, grad_line["lock_f_minus"].values.ravel())
    _, y_peak = cal.gradient_peak(y, b_par)
    f_peak = float(np.interp(y_peak, y, f_plus))
    period_guess = float(np.interp(y_peak, y[1:-1], np.abs(np.gradient(f_plus, y)[1:-1])))
    period_guess = 1.0 / (ramsey_tau_s * max(period_guess, 1.0))
    half = max(12 * period_guess, 1.0)
    step = period_guess / 10
    y_lo = round(y_peak - half, 3)
    uids["ramsey_line"], _ = yield from take(rasters.ramsey_raster(
        devices, x=(0.0, 0.0, 1), y=(y_lo, round(y_lo + 2 * half, 3),
                                      int(round(2 * half / step)) + 1),
        z=ramsey_height_nm, mw_frequency_hz=f_peak, tau_s=ramsey_tau_s, shots=shots,
        md={"measurement": "ramsey_line", "gradient_peak_nm": y_peak, **(md or {})}))

    uids["cw_gradient_line"], cw_line = yield from take(rasters.psf_map(
        devices, x=line, y=(0.0, 0.0, 1), z=cw_height_nm, mw_frequency_hz=mw_frequency_hz,
        shots=shots, snake=False, md={"measurement": "cw_gradient_line", **(md or {})}))
    x = cw_line["x"].values
    f_plus = cw_line["lock_frequency"].values.ravel()
    b_par = cal.field_along_axis(f_plus, cw_line["lock_f_minus"].values.ravel())
    grad = np.abs(np.gradient(b_par, x)) * 1e4
    target = cw_gradient_gauss_per_nm
    i = int(np.nanargmin(np.abs(grad - target) + 1e3 * (grad < 0.8 * target)))
    x_c, f_c = float(x[i]), float(f_plus[i])
    f_slope = abs(float(np.gradient(f_plus, x)[i]))
    width = 1.0 / (120e-9 * max(f_slope, 1.0))
    x_lo = round(x_c - 8 * width, 4)
    uids["cw_slice"], _ = yield from take(rasters.esr_raster(
        devices, x=(x_lo, round(x_c + 8 * width, 4), 161), y=(0.0, 0.0, 1), z=cw_height_nm,
        mw_frequency_hz=f_c, shots=shots,
        md={"measurement": "cw_slice", "gradient_gauss_per_nm_here": float(grad[i]),
            **(md or {})}))
    return uids


def dark_spin_line(devices: Any, span_hz: float = 40e6, num: int = 81, tau_s: float = 10e-6,
                   evolution_taus_s: tuple[float, ...] | None = None,
                   mw_frequency_hz: float = rasters.F_NV_START_HZ, shots: int = 200_000,
                   md: dict | None = None) -> Generator[Any, Any, dict[str, str]]:
    """Tip-free dark-spin ESR line (centre, width), then the DEER evolution on it.

    The RF sweep is centred on gamma_e B0 estimated from the NV line found
    with the tip retracted (f+ = D + gamma B0 for a field along the axis).

    Yields
    ------
    Msg

    Returns
    -------
    dict
        ``{"deer_spectrum": uid, "deer_evolution": uid}``.
    """
    from nvmri_bluesky import physics
    from nvmri_bluesky.reconstruct.psf import fit_lorentzian

    uids: dict[str, str] = {}
    guess = yield from _retracted_line(devices, mw_frequency_hz, shots)
    centre = guess - physics.D_ZFS
    uids["deer_spectrum"], spectrum = yield from take(sweeps.deer_spectrum(
        devices, centre - span_hz, centre + span_hz, num, tau_s=tau_s, mw_frequency_hz=guess,
        shots=shots, md={"measurement": "deer_spectrum", **(md or {})}))
    contrast = spectrum["deer_contrast"].values
    fit = fit_lorentzian(spectrum["rf_frequency"].values, contrast)
    if not fit.amplitude > 5 * fit.amplitude_sigma:
        raise NvmriError("no dark-spin ESR line within "
                         f"+/-{span_hz / 1e6:.0f} MHz of {centre / 1e9:.4f} GHz")
    taus = evolution_taus_s or tuple(np.round(np.linspace(0.4e-6, 30e-6, 75), 9))
    uids["deer_evolution"], _ = yield from take(sweeps.deer_evolution(
        devices, taus, rf_frequency_hz=fit.centre_hz, mw_frequency_hz=guess, shots=shots,
        md={"measurement": "deer_evolution", **(md or {})}))
    return uids


def _retracted_line(devices: Any, mw_frequency_hz: float, shots: int
                    ) -> Generator[Any, Any, float]:
    """The NV ms=0->+1 frequency with the tip retracted (no run), Hz."""
    from nvmri_bluesky.plans import pulses
    from nvmri_bluesky.plans.lock import FrequencyLock, lock_detunings, locked_acquire
    from nvmri_bluesky.plans.stubs import prepare, retract

    lock = FrequencyLock()
    program = pulses.frequency_lock(lock_detunings(lock.fwhm_hz))
    yield from retract(devices.stage)
    yield from prepare(devices, program, shots, mw_on=True, rf_on=False)
    yield from locked_acquire(devices, lock, program, mw_frequency_hz)
    return float(lock.frequency.get())
