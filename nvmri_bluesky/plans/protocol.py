"""The paper's protocol as plans: each step decided from the data just taken.

``calibration`` (Fig. 2), ``any_sample`` (the default for every sample: the
tip-free DEER evolution decides between point spins, a layer, both or
nothing), ``single_spins`` (Fig. 4) and ``surface_layers`` (Fig. 3) run the
measurement plans in order and choose the next one's parameters from the previous runs'
data (read from the documents as they are emitted: what the instrument gives,
nothing else).  Each returns ``{measurement: uid}``; the reconstruction then
reads those runs back from the catalog.

Run them from IPython like any plan, e.g. ``uids = RE(calibration(nv))``
returns the uids in ``RE``'s plan return value.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import xarray as xr

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans import rasters, sweeps
from nvmri_bluesky.plans.adaptive import adaptive_spin
from nvmri_bluesky.plans.take import take
from nvmri_bluesky.reconstruct import calibration_design as cal


def calibration(devices: Any, mw_frequency_hz: float = rasters.F_NV_START_HZ,
                ramsey_height_nm: float = cal.RAMSEY_HEIGHT_NM,
                ramsey_tau_s: float = cal.RAMSEY_TAU_S, cw_height_nm: float = cal.CW_HEIGHT_NM,
                cw_gradient_gauss_per_nm: float = cal.CW_GRADIENT_GAUSS_PER_NM,
                line_half_nm: float = cal.LINE_HALF_NM, shots: int = cal.SHOTS,
                md: dict | None = None) -> Generator[Any, Any, dict[str, str]]:
    """Fig. 2: tip gradient, Ramsey fringe period and CW-ESR slice width.

    1. Two-transition lock line along y through the NV's lateral position
       (x = 0) at ``ramsey_height_nm``: B_par(y), f+(y), and where f+ is steepest.
    2. Ramsey line (tau = ``ramsey_tau_s``) across that point at the NV
       frequency locked there: the fringes.
    3. Two-transition lock line along x at ``cw_height_nm``: where the
       f+-equivalent gradient (what a CW slice measures) is
       ``cw_gradient_gauss_per_nm`` (``fig2.gradient_crossing``).
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
        f+-equivalent gradient at which the CW slice is measured (the paper's
        linear-Zeeman 12 G/nm), G/nm.
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
    line = cal.lock_line(line_half_nm)
    uids["gradient_line"], grad_line = yield from take(rasters.psf_map(
        devices, x=(0.0, 0.0, 1), y=line, z=ramsey_height_nm, mw_frequency_hz=mw_frequency_hz,
        shots=shots, snake=False, md={"measurement": "gradient_line", **(md or {})}))
    ramsey = cal.design_ramsey_line(grad_line, ramsey_tau_s)
    uids["ramsey_line"], _ = yield from take(rasters.ramsey_raster(
        devices, x=(0.0, 0.0, 1), y=ramsey.axis, z=ramsey_height_nm,
        mw_frequency_hz=ramsey.mw_frequency_hz, tau_s=ramsey_tau_s, shots=shots,
        md={"measurement": "ramsey_line", "gradient_peak_nm": ramsey.centre_nm, **(md or {})}))

    uids["cw_gradient_line"], cw_line = yield from take(rasters.psf_map(
        devices, x=line, y=(0.0, 0.0, 1), z=cw_height_nm, mw_frequency_hz=mw_frequency_hz,
        shots=shots, snake=False, md={"measurement": "cw_gradient_line", **(md or {})}))
    cw = cal.design_cw_slice(cw_line, cw_gradient_gauss_per_nm)
    uids["cw_slice"], _ = yield from take(rasters.esr_raster(
        devices, x=cw.axis, y=(0.0, 0.0, 1), z=cw_height_nm,
        mw_frequency_hz=cw.mw_frequency_hz, shots=shots,
        md={"measurement": "cw_slice", "gradient_gauss_per_nm_here": cw.gradient_gauss_per_nm,
            **(md or {})}))
    return uids


class Measured(dict):
    """What a protocol step returns: measurement name -> run uid.

    ``not_done`` lists the parts of the step that could not be measured, each
    a line saying why (e.g. a layer PSF map whose lock could not follow); the
    runs of the other parts are in the dict as usual.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.not_done: list[str] = []


def _psf_ingredients(devices: Any, grid: dict, shots: int, md: dict | None,
                     uids: dict[str, str], name: str = "psf_map", node_sigma: bool = False
                     ) -> Generator[Any, Any, tuple[Any, float, float]]:
    """PSF map run (its uid into ``uids[name]``) -> (detuning interpolant, f+ retracted,
    predicted dark line); ``node_sigma``: the interpolant carries the nodes' noise, as the
    reconstruction fits it."""
    from nvmri_bluesky.reconstruct import detuning as dt

    uids[name], psf = yield from take(rasters.psf_map(
        devices, x=grid["x"], y=grid["y"], z=grid["z"], shots=shots,
        md={"measurement": name, **(md or {})}))
    try:
        detuning = dt.DetuningInterpolant.from_map(
            dt.dark_detuning_map(psf), dt.dark_detuning_sigma(psf) if node_sigma else None)
    except NvmriError as error:          # e.g. a map that stopped before its 4th plane
        raise NvmriError(f"{error} ({psf.attrs.get('stop_reason') or 'map complete'})"
                         ) from error
    f_plus0 = float(psf.attrs["f_nv0_hz"])
    line = float(physics.dark_spin_frequency_from_transitions(f_plus0, psf.attrs["f_minus0_hz"]))
    return detuning, f_plus0, line


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
       reconstruction fits the rasters jointly).
    6. Zoom: a small, finely stepped DEER raster across the strongest spin's
       ring on the highest plane where the map predicts the paper's
       resolution (``design_zoom_raster``).

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
    from nvmri_bluesky.reconstruct.localize import fit_deer_evolution

    uids, ingredients, evolution = yield from _spin_ingredients(devices, md)
    uids.update((yield from spin_rasters(devices, ingredients,
                                         (fit_deer_evolution(evolution).nu_hz,), quick, md)))
    return uids


def _spin_ingredients(devices: Any, md: dict | None, node_sigma: bool = False
                      ) -> Generator[Any, Any, tuple[Measured, tuple, xr.Dataset]]:
    """PSF map and tip-free DEER evolution: (uids, (detuning, f+ retracted, line), evolution)
    (``node_sigma``: :func:`_psf_ingredients`)."""
    from nvmri_bluesky.reconstruct import protocol as design

    uids = Measured()
    detuning, f_plus0, f_line = yield from _psf_ingredients(
        devices, design.SPIN_PSF_MAP, design.SPIN_SHOTS, md, uids, node_sigma=node_sigma)
    uids["deer_evolution"], evolution = yield from take(sweeps.deer_evolution(
        devices, design.EVOLUTION_TAUS_S, rf_frequency_hz=f_line, mw_frequency_hz=f_plus0,
        shots=design.SPIN_SHOTS, md={"measurement": "deer_evolution", **(md or {})}))
    return uids, (detuning, f_plus0, f_line), evolution


def _raster_name(base: str, k: int) -> str:
    """Measurement name of coupling class k's raster (``deer_survey``, ``deer_survey_2``, ...)."""
    return base if k == 0 else f"{base}_{k + 1}"


def spin_rasters(devices: Any, ingredients: tuple, couplings_hz: tuple[float, ...],
                 quick: bool = False, md: dict | None = None,
                 coherence: Any = None, line: Any = None, layer: Any = None,
                 layer_detuning: Any = None) -> Generator[Any, Any, dict[str, str]]:
    """DEER spectrum, then a survey and a fine raster per coupling class.

    The spectrum is taken at the tau of the strongest coupling; each class of
    couplings (:func:`~nvmri_bluesky.reconstruct.crosscheck.coupling_classes`)
    gets a survey at its own tau (a weak spin beside a strong one needs a
    longer free time) and a fine raster over the rings of the spins that
    survey found and no stronger class's survey had found.

    Parameters
    ----------
    devices
        The instrument.
    ingredients : (DetuningInterpolant, float, float)
        Measured Delta f_dark map, f+ with the tip retracted (Hz), predicted
        dark-spin line (Hz).
    couplings_hz : tuple of float
        Couplings seen in the tip-free evolution, Hz.
    quick : bool
        Half the tip-free spectrum points (tests).
    md : dict, optional
    coherence : callable, optional
        Coherence a layer leaves at tau (weighs the choice of tau).
    line : FlipLine, optional
        A dark-spin line measured already (a layer's spectrum): no spectrum run.
    layer : LayerFit, optional
        A layer imaged on the same NV: the survey's spins are found with its
        expected image as a known background (``spinmodel.with_layer_background``),
        so the layer's resonant ring is not taken for a spin.
    layer_detuning : DetuningInterpolant, optional
        The layer's PSF map (where the spin map does not reach the layer plane).

    Yields
    ------
    Msg

    Returns
    -------
    dict
        measurement -> uid.
    """
    from nvmri_bluesky.reconstruct import protocol as design
    from nvmri_bluesky.reconstruct.crosscheck import coupling_classes
    from nvmri_bluesky.reconstruct.evidence import DELTA_DEVIANCE_MIN
    from nvmri_bluesky.reconstruct.lines import fit_deer_spectrum
    from nvmri_bluesky.reconstruct.localize import localize_spins
    from nvmri_bluesky.reconstruct.spinmodel import with_layer_background

    detuning, f_plus0, f_line = ingredients
    taus = [design.choose_tau(nu, coherence=coherence) for nu in coupling_classes(couplings_hz)]
    uids: dict[str, str] = {}
    if line is None:
        uids["deer_spectrum"], spectrum = yield from take(sweeps.deer_spectrum(
            devices, *design.spectrum_axis(f_line, quick), tau_s=taus[0],
            mw_frequency_hz=f_plus0, shots=design.SPECTRUM_SHOTS,
            md={"measurement": "deer_spectrum",
                "point_couplings_hz": [float(nu) for nu in couplings_hz], **(md or {})}))
        _, line = fit_deer_spectrum(spectrum)
    known: list[np.ndarray] = []             # offsets found by the stronger classes' surveys
    for k, tau in enumerate(taus):
        survey = design.design_spin_raster(detuning, line.centre_hz, tau,
                                           step_nm=design.SPIN_SURVEY_STEP_NM)
        name = _raster_name("deer_survey", k)
        uids[name], survey_data = yield from take(_deer_raster(
            devices, survey, f_plus0, {"measurement": name, **(md or {})}))
        if layer is not None:
            survey_data = with_layer_background(survey_data, detuning, line, layer,
                                                fallback=layer_detuning)
        # a weaker class's survey (long tau, little echo left, a 4 nm lattice across a
        # thin ring) screens for where to look closer: a candidate at the evolution's
        # threshold earns a fine raster; the joint fit of both must bring the report's
        # (localize.MIN_DELTA_DEVIANCE)
        found = localize_spins(survey_data, detuning, line,
                               **({} if k == 0 else {"min_delta_deviance": DELTA_DEVIANCE_MIN}))
        # a stronger class's fine raster images its spins already: a weaker class's fine
        # raster covers only the spins new to its survey (the reconstruction merges the
        # classes' spins the same way, analysis.spins._merge_spins)
        new = design.unseen([s.offset_nm for s in found.spins], known)
        known.extend(s.offset_nm for s in found.spins)
        if not new:
            continue
        fine = design.design_fine_raster(detuning, survey, new, line.fwhm_hz)
        if fine is not None:
            name = _raster_name("deer_raster", k)
            uids[name], _ = yield from take(_deer_raster(
                devices, fine, f_plus0, {"measurement": name, **(md or {})}))
        if k == 0:                 # the strongest class's first spin, at the finest slice
            zoom = design.design_zoom_raster(detuning, survey, line.centre_hz,
                                             found.spins[0].offset_nm, line.fwhm_hz)
            if zoom is not None:
                uids["deer_zoom"], _ = yield from take(_deer_raster(
                    devices, zoom, f_plus0, {"measurement": "deer_zoom", **(md or {})}))
    return uids


def in_prior(content: Any) -> tuple[float, ...]:
    """The evolution's couplings a survey is designed for: those not more than 3 sigma below
    the prior's weakest (:data:`~nvmri_bluesky.reconstruct.protocol.PRIOR_MIN_COUPLING_HZ`;
    the report rejects such spins the same way).  Two comparable couplings that beat can be
    fitted as one spin between them and a slow one near their difference (e.g. 25 kHz for
    200 and 233 kHz), whose survey at a ~20 us tau would find nothing."""
    from nvmri_bluesky.reconstruct.protocol import PRIOR_MIN_COUPLING_HZ

    return tuple(nu for nu, sigma in zip(content.couplings_hz, content.coupling_sigmas_hz,
                                         strict=True)
                 if abs(nu) + 3.0 * sigma >= PRIOR_MIN_COUPLING_HZ)


def any_sample(devices: Any, quick: bool = False, md: dict | None = None
               ) -> Generator[Any, Any, dict[str, str]]:
    """One protocol for any sample: the data decide between spins, a layer, both or nothing.

    1. PSF map and tip-free DEER evolution (as :func:`single_spins`).
    2. The evolution's content by likelihood-ratio model choice
       (:func:`~nvmri_bluesky.reconstruct.evidence.classify_evolution`):
       oscillations (point spins with couplings nu_k), a decay (a layer),
       both, or nothing.  Point spins beside which weaker couplings are not
       excluded: the evolution is repeated (``deer_evolution_2``, counts
       summed) with the shots that would exclude them
       (``evolution_shot_factor``, at most
       :data:`~nvmri_bluesky.reconstruct.protocol.EVOLUTION_MAX_SHOT_FACTOR`
       in all) and read again.
    3. A layer: :func:`surface_layers`' runs (its own PSF map reaching lower),
       and its height and density from its image (``fit_layer_image``).  A
       layer its image refutes is dropped and the evolution read again
       without one (``without_refuted_layer``: weak spins that beat).  Layer
       runs that cannot be completed (a lock that cannot follow the line)
       end with their reason in ``not_done``; the decay is then unexplained,
       so the spin surveys also cover the couplings a layer would hide.
    4. Point spins: :func:`spin_rasters` (a survey per coupling class).  Couplings
       below every class that the evolution cannot exclude beside the spins it
       saw (``unexcluded_couplings``: a weak spin beside strong ones) get a
       survey too.  A
       layer's decay can hide point spins from the evolution, so with a layer
       the spin survey runs anyway, designed for
       :data:`~nvmri_bluesky.reconstruct.protocol.HIDDEN_SPIN_COUPLINGS_HZ` (one
       survey per coupling class); the survey's spins are found with the
       layer's expected image as a known background (the joint model), and
       the reconstruction's evidence decides.
    5. Nothing: no more runs (the report gives the detection limit).

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
    Measured
        measurement -> uid (every name unique); ``not_done`` says which part could
        not be measured and why (the layer runs, when their lock could not follow).
    """
    from nvmri_bluesky.reconstruct import protocol as design
    from nvmri_bluesky.reconstruct.crosscheck import (
        combine_evolutions,
        evolution_shot_factor,
        unexcluded_couplings,
    )
    from nvmri_bluesky.reconstruct.evidence import (
        DELTA_DEVIANCE_MIN,
        classify_evolution,
        without_refuted_layer,
    )
    from nvmri_bluesky.reconstruct.layer_fits import fit_layer_image

    uids, ingredients, evolution = yield from _spin_ingredients(devices, md)
    content = classify_evolution(evolution)
    if content.couplings_hz and not content.layer:
        # couplings below the classes seen that the evolution cannot exclude beside them
        # (a weak spin beside strong ones): the same evolution again, if a few more
        # shots would exclude (or show) them; its counts add to the first run's
        shots = design.repeat_evolution_shots(evolution_shot_factor(
            evolution, content, in_prior(content), nu_min_hz=design.PRIOR_MIN_COUPLING_HZ))
        if shots is not None:
            _, f_plus0, f_line = ingredients
            uids["deer_evolution_2"], repeat = yield from take(sweeps.deer_evolution(
                devices, design.EVOLUTION_TAUS_S, rf_frequency_hz=f_line,
                mw_frequency_hz=f_plus0, shots=shots,
                md={"measurement": "deer_evolution_2", **(md or {})}))
            evolution = combine_evolutions([evolution, repeat])
            content = classify_evolution(evolution)
    line = layer = layer_detuning = None
    couplings = in_prior(content)
    if content.layer:
        try:
            line, (layer_raster, layer_detuning) = yield from _layer_runs(
                devices, quick, md, uids)
        except NvmriError as error:     # e.g. a lock that could not follow: spins still
            uids.not_done.append(f"layer: {error}")
            # the decay is not explained by an image: weak spins as well as a layer
            couplings = (*couplings, *design.HIDDEN_SPIN_COUPLINGS_HZ)
        else:
            image = fit_layer_image(layer_raster, layer_detuning, line)
            layer = image if image.delta_deviance >= DELTA_DEVIANCE_MIN else None
            if layer is None:           # refuted by its image: spins that beat?
                content = without_refuted_layer(evolution, content)
                couplings = in_prior(content)
    # an imaged layer is the rasters' fitted background (only its resonant slice flips
    # there): its tip-free decay, where every layer spin flips, does not weigh the tau
    joint = {"coherence": content.layer_coherence if layer is None else None,
             "layer": layer, "layer_detuning": layer_detuning}
    if content.couplings_hz:
        # weaker couplings than every class surveys, which the evolution cannot exclude
        # beside the spins it saw (their oscillations take most of a weak spin's signal):
        # a survey each, as for the couplings a layer hides
        couplings = (*couplings, *unexcluded_couplings(
            evolution, content, couplings, nu_min_hz=design.PRIOR_MIN_COUPLING_HZ))
    if couplings:                       # seen in the evolution: their own spectrum
        uids.update((yield from spin_rasters(devices, ingredients, couplings,
                                             quick, md, **joint)))
    elif content.layer:                 # hidden by the layer's decay? the layer's line
        uids.update((yield from spin_rasters(
            devices, ingredients, design.HIDDEN_SPIN_COUPLINGS_HZ, quick, md,
            line=line, **joint)))
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
    uids = Measured()
    yield from _layer_runs(devices, quick, md, uids)
    return uids


def _layer_runs(devices: Any, quick: bool, md: dict | None, uids: dict[str, str]
                ) -> Generator[Any, Any, tuple[Any, tuple[Any, Any]]]:
    """:func:`surface_layers`' runs, their uids into ``uids`` as they are taken;
    (the fitted dark-spin line, (the layer raster's data, the layer PSF map's
    Delta f_dark interpolant))."""
    from nvmri_bluesky.reconstruct import protocol as design
    from nvmri_bluesky.reconstruct.lines import fit_deer_spectrum

    detuning, f_plus0, f_line = yield from _psf_ingredients(
        devices, design.LAYER_PSF_MAP, design.LAYER_SHOTS, md, uids, name="layer_psf_map")
    uids["layer_spectrum"], spectrum = yield from take(sweeps.deer_spectrum(
        devices, *design.spectrum_axis(f_line, quick), tau_s=design.LAYER_TAU_S,
        mw_frequency_hz=f_plus0, shots=design.LAYER_EVOLUTION_SHOTS,
        md={"measurement": "layer_spectrum", **(md or {})}))
    _, line = fit_deer_spectrum(spectrum, model="bath")
    raster = design.design_layer_raster(detuning, line.centre_hz)
    uids["layer_raster"], raster_data = yield from take(_deer_raster(
        devices, raster, f_plus0, {"measurement": "layer_raster", **(md or {})}))
    uids["layer_decay"], _ = yield from take(sweeps.deer_evolution(
        devices, design.LAYER_EVOLUTION_TAUS_S, rf_frequency_hz=line.centre_hz,
        mw_frequency_hz=f_plus0, shots=design.LAYER_EVOLUTION_SHOTS,
        md={"measurement": "layer_decay", **(md or {})}))
    return line, (raster_data, detuning)


STEPS = {"calibration": calibration, "sample": any_sample, "spins": single_spins,
         "layers": surface_layers, "adaptive": adaptive_spin}
"""The protocol's steps by name (``nvmri demo`` runs them per sample)."""


def step_plan(step: str, devices: Any, quick: bool = False) -> Generator:
    """The plan of one protocol step (``calibration``, ``sample``, ``spins``, ``layers`` or
    ``adaptive``)."""
    if step == "calibration":
        return calibration(devices, line_half_nm=40.0 if quick else 60.0)
    return STEPS[step](devices, quick=quick)
