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
from nvmri_bluesky.physics import GAMMA_E
from nvmri_bluesky.plans import rasters, sweeps
from nvmri_bluesky.reconstruct.fig2 import field_gradient_map
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
    yield from bpp.subs_wrapper(plan, collector)
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
        Half-length of the lock lines (2 nm steps), nm.
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
    n = int(line_half_nm) + 1                                  # 2 nm steps
    line = (-line_half_nm, line_half_nm, n)
    uids["gradient_line"], grad_line = yield from take(rasters.psf_map(
        devices, x=(0.0, 0.0, 1), y=line, z=ramsey_height_nm, mw_frequency_hz=mw_frequency_hz,
        shots=shots, snake=False, md={"measurement": "gradient_line", **(md or {})}))
    y = grad_line["y"].values
    f_plus = grad_line["lock_frequency"].values.ravel()
    grads = field_gradient_map(grad_line, along="y")
    i_peak = int(np.nanargmax(np.abs(grads["dbpar"].values.ravel()[1:-1]))) + 1
    y_peak, f_peak = float(y[i_peak]), float(f_plus[i_peak])
    f_slope = abs(float(grads["dfplus_equiv"].values.ravel()[i_peak])) * 1e-4 * GAMMA_E
    period_guess = 1.0 / (ramsey_tau_s * max(f_slope, 1.0))
    half = max(8 * period_guess, 1.0)
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
    grads = field_gradient_map(cw_line, along="x")
    grad = np.abs(grads["dbpar"].values.ravel())
    target = cw_gradient_gauss_per_nm
    i = int(np.nanargmin(np.abs(grad - target) + 1e3 * (grad < 0.8 * target)))
    x_c, f_c = float(x[i]), float(f_plus[i])
    f_slope = abs(float(grads["dfplus_equiv"].values.ravel()[i])) * 1e-4 * GAMMA_E
    width = 1.0 / (120e-9 * max(f_slope, 1.0))
    x_lo = round(x_c - 8 * width, 4)
    uids["cw_slice"], _ = yield from take(rasters.esr_raster(
        devices, x=(x_lo, round(x_c + 8 * width, 4), 161), y=(0.0, 0.0, 1), z=cw_height_nm,
        mw_frequency_hz=f_c, shots=shots,
        md={"measurement": "cw_slice", "gradient_gauss_per_nm_here": float(grad[i]),
            **(md or {})}))
    return uids


def _psf_ingredients(devices: Any, grid: dict, shots: int, md: dict | None
                     ) -> Generator[Any, Any, tuple[str, Any, float, float]]:
    """PSF map run -> (uid, detuning interpolant, f+ retracted, predicted dark line)."""
    from nvmri_bluesky import physics
    from nvmri_bluesky.reconstruct.psf import DetuningInterpolant, dark_detuning_map

    uid, psf = yield from take(rasters.psf_map(
        devices, x=grid["x"], y=grid["y"], z=grid["z"], shots=shots,
        md={"measurement": "psf_map", **(md or {})}))
    try:
        detuning = DetuningInterpolant.from_map(dark_detuning_map(psf))
    except NvmriError as error:          # e.g. a map that stopped before its 4th plane
        raise NvmriError(f"{error} ({psf.attrs.get('stop_reason') or 'map complete'})"
                         ) from error
    f_plus0 = float(psf.attrs["f_nv0_hz"])
    line = float(physics.dark_spin_frequency_from_transitions(f_plus0, psf.attrs["f_minus0_hz"]))
    return uid, detuning, f_plus0, line


def single_spins(devices: Any, quick: bool = False, md: dict | None = None
                 ) -> Generator[Any, Any, dict[str, str]]:
    """Fig. 4: find and image point dark spins near the NV (no prior position).

    1. PSF map: both NV transitions locked over a 3D grid, and with the tip
       retracted (the dark-spin line gamma |B0| follows from them).
    2. Tip-free DEER evolution on that line: the coupling |nu|, hence tau.
    3. Tip-free DEER spectrum at that tau: the line centre and width.
    4. Survey: a coarse DEER raster (per-point lock), RF offset and window
       designed from the measured map so any spin in the prior box shows
       its ring; the spins are localised from it.
    5. Fine DEER raster, two planes, over the rings of the spins found (the
       reconstruction fits both rasters jointly).

    Parameters
    ----------
    devices
        The instrument.
    quick : bool
        Half the tip-free spectrum points (tests).
    md : dict, optional

    Yields
    ------
    Msg

    Returns
    -------
    dict
        measurement -> uid.
    """
    from nvmri_bluesky.reconstruct import protocol as design
    from nvmri_bluesky.reconstruct.localize import fit_deer_evolution, localize_spins
    from nvmri_bluesky.reconstruct.psf import fit_deer_spectrum

    uids: dict[str, str] = {}
    shots = design.SPIN_SHOTS
    uids["psf_map"], detuning, f_plus0, f_line = yield from _psf_ingredients(
        devices, design.SPIN_PSF_MAP, shots, md)
    taus = design.EVOLUTION_TAUS_S
    uids["deer_evolution"], evolution = yield from take(sweeps.deer_evolution(
        devices, taus, rf_frequency_hz=f_line, mw_frequency_hz=f_plus0, shots=shots,
        md={"measurement": "deer_evolution", **(md or {})}))
    tau = design.choose_tau(fit_deer_evolution(evolution).nu_hz)
    span, num = design.SPECTRUM_SPAN_HZ, design.SPECTRUM_POINTS
    uids["deer_spectrum"], spectrum = yield from take(sweeps.deer_spectrum(
        devices, f_line - span, f_line + span, num if not quick else num // 2 + 1,
        tau_s=tau, mw_frequency_hz=f_plus0, shots=design.SPECTRUM_SHOTS,
        md={"measurement": "deer_spectrum", **(md or {})}))
    _, line = fit_deer_spectrum(spectrum)
    survey = design.design_spin_raster(detuning, line.centre_hz, tau,
                                       step_nm=design.SPIN_SURVEY_STEP_NM)
    uids["deer_survey"], survey_data = yield from take(_deer_raster(
        devices, survey, f_plus0, {"measurement": "deer_survey", **(md or {})}))
    found = localize_spins(survey_data, detuning, line)
    fine = design.design_fine_raster(detuning, survey, [s.offset_nm for s in found.spins],
                                     line.fwhm_hz)
    if fine is not None:
        uids["deer_raster"], _ = yield from take(_deer_raster(
            devices, fine, f_plus0, {"measurement": "deer_raster", **(md or {})}))
    return uids


def _deer_raster(devices: Any, raster: Any, mw_frequency_hz: float, md: dict) -> Generator:
    """The locked DEER raster of a :class:`~nvmri_bluesky.reconstruct.protocol.RasterDesign`."""
    z = raster.z
    return rasters.deer_raster(
        devices, x=raster.x, y=raster.y, z=(z[0], z[-1], len(z)) if len(z) > 1 else z[0],
        rf_frequency_hz=raster.rf_frequency_hz, tau_s=raster.tau_s,
        mw_frequency_hz=mw_frequency_hz, shots=raster.shots, md=md)


def surface_layers(devices: Any, quick: bool = False, md: dict | None = None
                   ) -> Generator[Any, Any, dict[str, str]]:
    """Fig. 3: image a dark-spin layer above the NV; its height and density.

    1. PSF map over the layer's reach, both transitions.
    2. Tip-free DEER spectrum on the predicted line: centre and width.
    3. DEER raster in two planes with the RF offset that puts the resonant
       dome just below them (``design_layer_raster``).
    4. Tip-free DEER decay (many spins: a decay, not an oscillation): the
       density at the imaged height.

    Parameters
    ----------
    devices
        The instrument.
    quick : bool
        Half the tip-free spectrum points (tests).
    md : dict, optional

    Yields
    ------
    Msg

    Returns
    -------
    dict
        measurement -> uid.
    """
    from nvmri_bluesky.reconstruct import protocol as design
    from nvmri_bluesky.reconstruct.psf import fit_deer_spectrum

    uids: dict[str, str] = {}
    uids["psf_map"], detuning, f_plus0, f_line = yield from _psf_ingredients(
        devices, design.LAYER_PSF_MAP, design.LAYER_SHOTS, md)
    span, num = design.SPECTRUM_SPAN_HZ, design.SPECTRUM_POINTS
    uids["deer_spectrum"], spectrum = yield from take(sweeps.deer_spectrum(
        devices, f_line - span, f_line + span, num if not quick else num // 2 + 1,
        tau_s=design.LAYER_TAU_S, mw_frequency_hz=f_plus0, shots=design.LAYER_EVOLUTION_SHOTS,
        md={"measurement": "deer_spectrum", **(md or {})}))
    _, line = fit_deer_spectrum(spectrum, model="bath")
    raster = design.design_layer_raster(detuning, line.centre_hz)
    uids["deer_raster"], _ = yield from take(_deer_raster(
        devices, raster, f_plus0, {"measurement": "deer_raster", **(md or {})}))
    uids["deer_decay"], _ = yield from take(sweeps.deer_evolution(
        devices, design.LAYER_EVOLUTION_TAUS_S, rf_frequency_hz=line.centre_hz,
        mw_frequency_hz=f_plus0, shots=design.LAYER_EVOLUTION_SHOTS,
        md={"measurement": "deer_decay", **(md or {})}))
    return uids


STEPS = {"calibration": calibration, "spins": single_spins, "layers": surface_layers}
"""The protocol's steps by name (``nvmri demo`` runs them per sample)."""


def step_plan(step: str, devices: Any, quick: bool = False) -> Generator:
    """The plan of one protocol step (``calibration``, ``spins`` or ``layers``)."""
    if step == "calibration":
        return calibration(devices, line_half_nm=40.0 if quick else 60.0)
    return STEPS[step](devices, quick=quick)
