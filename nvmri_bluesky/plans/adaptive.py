"""Adaptive single-spin imaging (issue 15): measure where the information is, stop at a target.

After the protocol's PSF map, tip-free evolution, spectrum and survey
(:mod:`.protocol`), the fixed fine and zoom rasters are replaced by a loop:

1. fit the survey and every point taken so far (``localize_spins``),
2. stop if every offset's sigma is at its target (``target_sigma_nm``) or the
   instrument time of the adaptive points reached ``budget_s``,
3. else recommend the next batch of tip positions and shots by expected
   information per instrument second (:func:`nvmri_bluesky.reconstruct.adaptive.recommend`)
   and measure it with the per-point locked DEER acquisition of the rasters
   (:func:`deer_points`: one run per batch, one event per point).

Every decision is in the documents: each batch's start document carries
the points and shots (``plan_args``) and, under ``adaptive``, the fit it was
decided from, the posterior, the predicted sigmas and the time spent; a
last, event-less ``adaptive_stop`` run says why the loop stopped and with
which sigmas.  The reconstruction reads the batches back from the catalog
like any raster (:func:`nvmri_bluesky.reconstruct.runs.run_dataset` turns a
``deer_points`` run into a list of points).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import Msg
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans.checks import _limits, check_frequency, check_positive
from nvmri_bluesky.plans.deer import DeerReadout, deer_program
from nvmri_bluesky.plans.lock import FrequencyLock, LockLost, Predictor, locked_acquire
from nvmri_bluesky.plans.metadata import run_metadata
from nvmri_bluesky.plans.rasters import F_NV_START_HZ
from nvmri_bluesky.plans.stubs import move_and_tune, prepare, record, set_frequency
from nvmri_bluesky.plans.take import take

__all__ = ["deer_points", "adaptive_spin", "adaptive_spin_rasters", "check_points",
           "ADAPTIVE_SURVEY_SHOTS", "ADAPTIVE_BUDGET_S", "ADAPTIVE_BATCH"]

ADAPTIVE_SURVEY_SHOTS = 20_000
"""Shots per point of the adaptive protocol's survey (finds the spin; the points refine it).
If it finds none, the survey is repeated with more shots (``deer_survey_more``, ``..._more2``:
each brings the shots so far to 3x, up to the fixed protocol's 200k in all), so a spin the
fixed protocol's survey finds is not missed."""
ADAPTIVE_BUDGET_S = 4 * 3600.0
"""Default instrument time allowed for the adaptive points, s."""
ADAPTIVE_BATCH = 12
"""Points per batch (a batch is one run; the fit wants at least 10 points per dataset)."""
ADAPTIVE_PLANES_NM = (0.0, 2.0)
"""Candidate planes above the survey's plane, nm (the fixed protocol's fine planes)."""


def check_points(stage: Any, tips: ArrayLike) -> np.ndarray:
    """Every tip inside the stage's soft limits, z never below z_min; (N, 3) nm.

    Parameters
    ----------
    stage
        Stage device with motors ``x``, ``y``, ``z``.
    tips : array_like (N, 3)
        Tip positions, nm.
    """
    t = np.asarray(tips, float)
    if t.ndim != 2 or t.shape[1] != 3 or t.shape[0] == 0 or not np.all(np.isfinite(t)):
        raise NvmriError(f"tips must be a non-empty (N, 3) array of finite nm, got shape "
                         f"{t.shape}")
    for i, name in enumerate("xyz"):
        motor = getattr(stage, name)
        lo, hi = _limits(motor)
        bad = (t[:, i] < lo) | (t[:, i] > hi)
        if bad.any():
            v = float(t[bad, i][0])
            what = "below z_min" if name == "z" and v < lo else "outside the limits"
            raise NvmriError(f"{name} = {v:g} nm is {what} of {motor.name} ({lo:g}..{hi:g} nm);"
                             f" nothing moved")
    return t


def _path(tips: np.ndarray, start: np.ndarray | None) -> np.ndarray:
    """Visiting order of ``tips``: nearest neighbour from ``start`` (or the first tip)."""
    left = list(range(len(tips)))
    here = tips[0] if start is None else start
    order = []
    while left:
        j = min(left, key=lambda i: float(np.sum((tips[i] - here) ** 2)))
        order.append(j)
        left.remove(j)
        here = tips[j]
    return np.array(order, int)


def deer_points(devices: Any, tips: ArrayLike, shots: Sequence[int], rf_frequency_hz: float,
                tau_s: float = 10e-6, mw_frequency_hz: float = F_NV_START_HZ,
                rf_duration_s: float = 100e-9, locked: tuple[ArrayLike, ArrayLike] | None = None,
                md: dict | None = None) -> Generator[Any, Any, str]:
    """Locked DEER at a list of tip positions, each with its own shots (one run).

    The per-point acquisition of :func:`~nvmri_bluesky.plans.rasters.deer_raster`
    (move, MW tuned to the predicted NV line, lock, record) at arbitrary
    points, visited in the given order; repeats allowed.  Each event
    carries the stage position, the counts, the lock, the DEER readout and
    the pulser's shots (``pulser_shots``) of that point.

    Parameters
    ----------
    devices
        The instrument (``stage``, ``mw``, ``rf``, ``pulser``, ``counter``).
    tips : array_like (N, 3)
        Tip positions (x, y, z apex height), nm.
    shots : sequence of int (N,)
        Shots per gate at each point.
    rf_frequency_hz : float
        RF carrier, Hz.
    tau_s : float
        DEER free-evolution time, s.
    mw_frequency_hz : float
        Where the lock looks first (without ``locked``), Hz.
    rf_duration_s : float
        RF pi-pulse length, s.
    locked : (positions (K, 3) nm, frequencies (K,) Hz), optional
        NV lines locked before (e.g. the survey's): the predictor starts from them.
    md : dict, optional

    Yields
    ------
    Msg
    """
    t = check_points(devices.stage, tips)
    n = np.asarray(shots, int)
    if n.shape != (t.shape[0],) or np.any(n <= 0):
        raise NvmriError(f"shots must be {t.shape[0]} positive integers, got {shots!r}")
    check_positive(tau_s=tau_s, rf_duration_s=rf_duration_s)
    check_frequency(devices.rf, rf_frequency_hz, "rf_frequency_hz")
    check_frequency(devices.mw, mw_frequency_hz, "mw_frequency_hz")
    lock, readout = FrequencyLock(), DeerReadout()
    program = deer_program(lock.fwhm_hz, tau_s, rf_duration_s)
    predictor = Predictor(mw_frequency_hz)
    if locked is not None:
        for position, f in zip(np.asarray(locked[0], float), np.asarray(locked[1], float),
                               strict=True):
            if np.all(np.isfinite(position)) and np.isfinite(f):
                predictor.add(position, float(f))
    stage = devices.stage
    motors = [stage.x, stage.y, stage.z]
    _md = run_metadata(devices, "deer_points", dict(
        tips_nm=np.round(t, 6).tolist(), shots=[int(s) for s in n],
        rf_frequency_hz=rf_frequency_hz, tau_s=tau_s, mw_frequency_hz=mw_frequency_hz,
        rf_duration_s=rf_duration_s), programs=[program],
        md={"num_points": int(t.shape[0]), **(md or {})})

    @bpp.run_decorator(md=_md)
    def inner():
        yield from prepare(devices, program, int(n[0]), mw_on=True, rf_on=True)
        yield from set_frequency(devices.rf, rf_frequency_hz)
        cache = dict.fromkeys(motors)
        current = int(n[0])
        for position, point_shots in zip(t, n, strict=True):
            if int(point_shots) != current:
                yield Msg("set", devices.pulser.shots, int(point_shots), group="shots")
                yield Msg("wait", None, group="shots")
                current = int(point_shots)
            predicted = predictor(position)
            yield from move_and_tune(dict(zip(motors, (float(v) for v in position),
                                              strict=True)), cache, devices.mw, predicted)
            try:
                counts = yield from locked_acquire(devices, lock, program, predicted,
                                                   tuned=True)
            except LockLost as error:
                x, y, z = position
                raise LockLost(f"{lock.name} at tip ({x:.2f}, {y:.2f}, {z:.2f}) nm: {error}"
                               ) from error
            predictor.add(position, lock.frequency.get())
            readout.update(counts)
            yield from record((*motors, devices.counter, lock, readout, devices.pulser.shots))

    return (yield from inner())


def _more_survey_shots(first: int, total: int) -> list[int]:
    """Shots of the survey's repeats when it finds nothing: each repeat brings the shots so
    far to 3x, the last one to ``total`` (20k -> +40k -> +140k for 200k)."""
    out, done = [], int(first)
    while done < total:
        nxt = min(3 * done, total)
        if total - nxt < nxt - done:        # no small last repeat: go to the total now
            nxt = total
        out.append(nxt - done)
        done = nxt
    return out


def _locked_lines(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """(positions (K, 3), locked f+ (K,)) of a locked raster's or point run's dataset."""
    import xarray as xr

    if "lock_frequency" not in ds:
        return np.zeros((0, 3)), np.zeros(0)
    f = ds["lock_frequency"]
    gx, gy, gz = xr.broadcast(ds["x"], ds["y"], ds["z"])
    gx, gy, gz = (g.broadcast_like(f).transpose(*f.dims) for g in (gx, gy, gz))
    pos = np.stack([gx.values.ravel(), gy.values.ravel(), gz.values.ravel()], -1)
    return pos, np.asarray(f.values, float).ravel()


def _decision_run(devices: Any, md: dict) -> Generator[Any, Any, str]:
    """An event-less run whose start document carries a decision (no instrument time)."""
    _md = run_metadata(devices, "adaptive_stop", {}, md=md)

    @bpp.run_decorator(md=_md)
    def inner():
        yield from bps.null()

    return (yield from inner())


def _shot_seconds(program_s: float, survey_data: Any, survey: Any) -> float:
    """Instrument seconds per shot as the survey paid them (lock re-triggers included:
    ~1.5-3x the program alone) when its stop document counts them, else the program's."""
    survey_s = survey_data.attrs.get("instrument_time_s")
    if not survey_s:
        return float(program_s)
    return max(float(program_s), float(survey_s) / (survey.n_points * survey.shots))


def _stop_run(devices: Any, fit: Any, reason: str, batches: int, spent_s: float,
              target: NDArray, md: dict | None) -> Generator[Any, Any, str]:
    """The ``adaptive_stop`` run: why the loop stopped, and the final fit."""
    from nvmri_bluesky.reconstruct import adaptive

    final = fit.spins[0].offset_sigma_nm if fit.spins else [float("nan")] * 3
    if fit.spins and adaptive.target_reached(final, target):
        reason = "target reached"
    return (yield from _decision_run(devices, {
        "measurement": "adaptive_stop", "reason": reason, "batches": batches,
        "spent_s": float(spent_s), "fit_sigma_nm": [float(v) for v in final],
        "fit_offset_nm": ([float(v) for v in fit.spins[0].offset_nm] if fit.spins else []),
        "target_sigma_nm": [float(v) for v in target], **(md or {})}))


def _spectrum_and_survey(devices: Any, ingredients: tuple, coupling_hz: float, tau: float,
                         survey_shots: int, quick: bool, md: dict | None,
                         uids: dict[str, str]) -> Generator[Any, Any, tuple]:
    """The spectrum at ``tau``, then the survey, repeated with more shots while it finds
    no spin (:func:`_more_survey_shots`); run uids go into ``uids``.

    Returns
    -------
    (FlipLine, RasterDesign of the survey, the first survey's dataset, every survey's
    dataset (fullest first), their fit)
    """
    from nvmri_bluesky.plans import sweeps
    from nvmri_bluesky.plans.protocol import _deer_raster
    from nvmri_bluesky.reconstruct import protocol as design
    from nvmri_bluesky.reconstruct.lines import fit_deer_spectrum
    from nvmri_bluesky.reconstruct.localize import localize_spins

    detuning, f_plus0, f_line = ingredients
    uids["deer_spectrum"], spectrum = yield from take(sweeps.deer_spectrum(
        devices, *design.spectrum_axis(f_line, quick), tau_s=tau, mw_frequency_hz=f_plus0,
        shots=design.SPECTRUM_SHOTS,
        md={"measurement": "deer_spectrum", "point_couplings_hz": [float(coupling_hz)],
            **(md or {})}))
    _, line = fit_deer_spectrum(spectrum)
    survey = design.design_spin_raster(detuning, line.centre_hz, tau,
                                       step_nm=design.SPIN_SURVEY_STEP_NM, shots=survey_shots)
    uids["deer_survey"], survey_data = yield from take(_deer_raster(
        devices, survey, f_plus0, {"measurement": "deer_survey", **(md or {})}))
    fit = localize_spins(survey_data, detuning, line)
    surveys = [survey_data]
    for k, extra in enumerate(_more_survey_shots(survey_shots, design.SPIN_SHOTS)):
        if fit.spins:
            break
        # nothing seen yet: the survey again with more shots, fitted with the ones before
        # (the fullest first: its deconvolution starts the fit), up to the fixed protocol's
        # shots in all, so a spin its survey finds is not missed
        name = "deer_survey_more" if k == 0 else f"deer_survey_more{k + 1}"
        uids[name], more_data = yield from take(_deer_raster(
            devices, dataclasses.replace(survey, shots=extra), f_plus0,
            {"measurement": name, **(md or {})}))
        surveys = sorted([*surveys, more_data], key=lambda d: -float(d.attrs["shots"]))
        fit = localize_spins(surveys, detuning, line)
    return line, survey, survey_data, surveys, fit


def adaptive_spin_rasters(devices: Any, ingredients: tuple, coupling_hz: float,
                          quick: bool = False, md: dict | None = None, *,
                          target_sigma_nm: ArrayLike = (0.3, 0.3, 0.05),
                          budget_s: float = ADAPTIVE_BUDGET_S, batch: int = ADAPTIVE_BATCH,
                          survey_shots: int = ADAPTIVE_SURVEY_SHOTS,
                          min_shots: int = 50_000, max_batches: int = 40,
                          seed: int = 0) -> Generator[Any, Any, dict[str, str]]:
    """Spectrum, survey, then adaptive batches of points until the target sigma.

    Parameters
    ----------
    devices
        The instrument.
    ingredients : (DetuningInterpolant, float, float)
        Measured Delta f_dark map, f+ with the tip retracted (Hz), predicted
        dark-spin line (Hz) (``protocol._spin_ingredients``).
    coupling_hz : float
        The spin's |nu| from the tip-free evolution (chooses tau), Hz.
    quick : bool
        Half the tip-free spectrum points (tests).
    md : dict, optional
    target_sigma_nm : array_like (3,)
        Stop when the fit's sigma of dx, dy, dz are all at or below these, nm.
    budget_s : float
        Stop when the adaptive points have cost this much instrument time, s (each
        batch's stop-document ``instrument_time_s`` when an
        :class:`~nvmri_bluesky.plans.accounting.InstrumentClock` counts it, else its
        shots x program duration).
    batch : int
        Points per batch (>= 10).
    survey_shots : int
        Shots per point of the survey; if it finds no spin, it is repeated with more
        shots (:func:`_more_survey_shots`), up to ``SPIN_SHOTS`` in all (the fixed
        protocol's survey).
    min_shots : int
        Fewest shots per adaptive point (the lock needs photons).
    max_batches : int
        Upper bound of the batches.
    seed : int
        Seed of the recommender's posterior draws (the decisions are reproducible).

    Yields
    ------
    Msg

    Returns
    -------
    dict
        measurement -> uid: ``deer_spectrum``, ``deer_survey`` (and ``deer_survey_more``,
        ``deer_survey_more2`` when it found nothing), ``deer_adaptive_1`` ...,
        ``adaptive_stop``.
    """
    from nvmri_bluesky.plans.accounting import instrument_time_s
    from nvmri_bluesky.reconstruct import adaptive
    from nvmri_bluesky.reconstruct import protocol as design
    from nvmri_bluesky.reconstruct.localize import localize_spins

    if batch < 10:
        raise NvmriError(f"batch must be >= 10 points (the fit's minimum), got {batch}")
    target = np.asarray(target_sigma_nm, float)
    detuning, f_plus0, _ = ingredients
    tau = design.choose_tau(coupling_hz)
    uids: dict[str, str] = {}
    line, survey, survey_data, surveys, fit = yield from _spectrum_and_survey(
        devices, ingredients, coupling_hz, tau, survey_shots, quick, md, uids)
    program = deer_program(FrequencyLock().fwhm_hz, tau, survey_data.attrs.get(
        "rf_duration_s", 100e-9))
    shot_s = _shot_seconds(program.duration, survey_data, survey)
    locked = tuple(np.concatenate(a) for a in zip(*map(_locked_lines, surveys), strict=True))
    limits = np.array([_limits(getattr(devices.stage, a)) for a in "xyz"], float)
    planes = [survey.z[0] + dz for dz in ADAPTIVE_PLANES_NM]
    points: list[Any] = []
    last = None
    spent = 0.0
    reason = "the survey found no spin"
    rng = np.random.default_rng(seed)
    for k in range(1, max_batches + 1):
        if not fit.spins:
            break
        sigma = fit.spins[0].offset_sigma_nm
        if adaptive.target_reached(sigma, target):
            reason = "target reached"
            break
        if spent >= budget_s:
            reason = "budget spent"
            break
        post = adaptive.posterior_from_fit(fit)
        draws = post.samples(24, rng)
        cand = adaptive.candidate_tips(detuning, line, survey.rf_frequency_hz, draws[:, :3],
                                       planes, limits_nm=limits)
        try:
            rec = adaptive.recommend(post, cand, detuning, line, survey.rf_frequency_hz,
                                     shot_s, batch=batch, target_sigma_nm=target,
                                     min_shots=min_shots, rng=rng)
        except NvmriError as error:         # e.g. the map's own noise is the floor now
            reason = f"no more information to gain: {error}"
            break
        order = _path(rec.tips, last)
        name = f"deer_adaptive_{k}"
        decision = {"batch": k, "fit_offset_nm": [float(v) for v in fit.spins[0].offset_nm],
                    "fit_sigma_nm": [float(v) for v in sigma],
                    "posterior_mean": [float(v) for v in post.mean],
                    "posterior_sigma": [float(v) for v in post.sigma],
                    "target_sigma_nm": [float(v) for v in target],
                    "candidates": int(len(cand)), "spent_s": float(spent),
                    "budget_s": float(budget_s), "shot_s": float(shot_s),
                    "program_shot_s": float(program.duration), **rec.as_dict()}
        uids[name], data = yield from take(deer_points(
            devices, rec.tips[order], rec.shots[order], survey.rf_frequency_hz, tau_s=tau,
            mw_frequency_hz=f_plus0, locked=locked,
            md={"measurement": name, "adaptive": decision, **(md or {})}))
        # what the batch cost (the stop document's, locks included, when counted)
        spent += float(data.attrs.get("instrument_time_s", instrument_time_s(
            rec.shots, np.full(len(rec.shots), shot_s))))
        points.append(data)
        last = rec.tips[order][-1]
        more = _locked_lines(data)
        locked = (np.r_[locked[0], more[0]], np.r_[locked[1], more[1]])
        fit = localize_spins([*surveys, adaptive.concat_points(points)], detuning, line)
    else:
        reason = "batches exhausted"
    uids["adaptive_stop"] = yield from _stop_run(devices, fit, reason, len(points), spent,
                                                 target, md)
    return uids


def adaptive_spin(devices: Any, quick: bool = False, md: dict | None = None,
                  **kwargs: Any) -> Generator[Any, Any, dict[str, str]]:
    """Fig. 4 adaptively: PSF map, tip-free evolution, then :func:`adaptive_spin_rasters`.

    Parameters
    ----------
    devices
        The instrument.
    quick : bool
        Half the tip-free spectrum points (tests).
    md : dict, optional
    **kwargs
        :func:`adaptive_spin_rasters`' keywords (``target_sigma_nm``, ``budget_s``, ...).

    Yields
    ------
    Msg

    Returns
    -------
    dict
        measurement -> uid.
    """
    from nvmri_bluesky.plans.protocol import _spin_ingredients
    from nvmri_bluesky.reconstruct.localize import fit_deer_evolution

    # the map with its nodes' noise, as the reconstruction fits it: the loop stops on the
    # sigmas the report will give
    uids, ingredients, evolution = yield from _spin_ingredients(devices, md, node_sigma=True)
    uids.update((yield from adaptive_spin_rasters(
        devices, ingredients, fit_deer_evolution(evolution).nu_hz, quick, md,
        **kwargs)))
    return uids
