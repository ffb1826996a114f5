"""Point dark spins: 3D offsets from the NV, couplings and resolution from DEER rasters.

The forward model, its noise model, Fisher information and the PSF map's share
of the covariance: :mod:`.spinmodel`.  Fit starts (deconvolution and matched
filter) and the fine density for Fig. 4: :mod:`.density`.  This module searches
and fits (:func:`localize_spins`) and fits the tip-free coupling
(:func:`fit_deer_evolution`).

Number of spins: spins are added one at a time (starts from the
deconvolution of the *residual* contrast) while the Poisson deviance drops by
at least ``min_delta_deviance`` (default 40: a likelihood-ratio test for 4
new parameters whose position is searched over the whole box, i.e. far
beyond the chi^2_4 quantiles a fixed position would need) *and* the new
spin's weight is significant (w / sigma_w >= 5).

Couplings: DEER measures w = 1 - cos(pi nu tau), not nu.  Every branch
|nu| = (2 pi k +/- arccos(1 - w)) / (pi tau) fits; the reported one is the
branch nearest the geometric dipolar coupling of the fitted offset
(``physics.dipolar_coupling``), with the sign of the geometric value (DEER
cannot see the sign), sigma_nu = sigma_w / |dw/dnu|.  A tip-free DEER
evolution (:func:`fit_deer_evolution`) measures |nu| directly; pass it as
``coupling_hint`` to report that instead.

Resolution: the width of the resonant slice where the spin is imaged.  At
every raster point where the spin's PSF is above half its maximum the
measured map's gradient gives FWHM_f / |grad_xy Delta f_dark| (lateral) and
FWHM_f / |d Delta f_dark/dz| (vertical), FWHM_f the width of the line fitted
with the spins (its T2* a nuisance of the raster fit, :func:`.spinmodel.widened`);
reported as the PSF-weighted mean and standard deviation over the slice, in the
raster that images the spin with the finest lateral slice (with several rasters,
e.g. the protocol's zoom raster at a lower apex).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct._poisson import PoissonFit, fit_sweep, initial_nuisance, poisson_ml
from nvmri_bluesky.reconstruct.counts import check_gates, deer_contrast_dataset, valid_points
from nvmri_bluesky.reconstruct.density import (
    MATCHED_STARTS,
    _matched_starts,
    _peaks,
    _residual_density,
    _spin_contrast,
    shift_operator,
)
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant
from nvmri_bluesky.reconstruct.evidence import periodogram_peak
from nvmri_bluesky.reconstruct.lines import FlipLine
from nvmri_bluesky.reconstruct.psf import DarkSpinPSF, feasible_offset_box
from nvmri_bluesky.reconstruct.spinmodel import (
    GATE_ORDER,
    PRIOR_BOX,
    _has_layer,
    _Layout,
    _map_covariance,
    _model_fn,
    _observed,
    _prepare,
    _Raster,
    widened,
)

__all__ = [
    "PRIOR_BOX", "SpinFit", "LocalizationResult", "localize_spins", "fit_deer_evolution",
    "CouplingFit", "MIN_DELTA_DEVIANCE",
]


# --------------------------------------------------------------------------- #
# data preparation
# --------------------------------------------------------------------------- #


MIN_DELTA_DEVIANCE = 40.0
"""Deviance drop (2 delta log L) a spin must bring to be kept (module doc)."""


# --------------------------------------------------------------------------- #
# the fit
# --------------------------------------------------------------------------- #


def _fit(rasters: Sequence[_Raster], theta0: NDArray, box: NDArray, line: FlipLine,
         max_iter: int = 200) -> PoissonFit:
    lay = _Layout.of(theta0, len(rasters), _has_layer(rasters))
    lo, hi = lay.bounds(box)
    return poisson_ml(_model_fn(rasters, lay), _observed(rasters), theta0, lo, hi,
                      prior_mean=np.zeros(theta0.size), prior_sigma=lay.priors(line),
                      max_iter=max_iter)


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class CouplingFit:
    """|nu| from a tip-free DEER evolution c(tau) = b + A (1 - cos(pi nu tau)).

    Attributes: ``nu_hz``, ``nu_sigma_hz``, ``amplitude`` (flip probability
    p(0) for one spin), ``amplitude_sigma``, ``chi2_reduced``.
    """

    nu_hz: float
    nu_sigma_hz: float
    amplitude: float
    amplitude_sigma: float
    chi2_reduced: float


@dataclass(frozen=True)
class SpinFit:
    """One localised dark spin.

    Attributes
    ----------
    offset_nm, offset_sigma_nm : ndarray (3,)
        Spin minus NV (dx, dy, dz) and one-sigma uncertainties, nm.
    weight, weight_sigma : float
        DEER weight w = 1 - cos(pi nu tau).
    coupling_hz, coupling_sigma_hz : float
        Reported coupling (see module doc) and its sigma, Hz.
    coupling_geometric_hz : float
        physics.dipolar_coupling of the fitted offset, Hz.
    coupling_branches_hz : ndarray
        All |nu| consistent with w (first branches), Hz.
    resolution_lateral_nm, resolution_vertical_nm : (value, spread) tuples
        Slice widths where the spin is imaged (module doc), nm.
    delta_deviance : float
        Drop of the Poisson deviance when this spin was added (its evidence).
    at_bound : ndarray of bool (3,)
        Which offset ended on the search box's bound (not determined there).
    """

    offset_nm: NDArray
    offset_sigma_nm: NDArray
    weight: float
    weight_sigma: float
    coupling_hz: float
    coupling_sigma_hz: float
    coupling_geometric_hz: float
    coupling_branches_hz: NDArray = field(repr=False)
    resolution_lateral_nm: tuple[float, float] = (float("nan"), float("nan"))
    resolution_vertical_nm: tuple[float, float] = (float("nan"), float("nan"))
    delta_deviance: float = float("nan")
    at_bound: NDArray = field(default_factory=lambda: np.zeros(3, bool))


@dataclass(frozen=True)
class LocalizationResult:
    """Output of :func:`localize_spins`.

    Attributes
    ----------
    spins : tuple of SpinFit
        Strongest weight first.
    nuisance : ndarray (n_datasets, 3)
        Fitted (a, a C, E) per dataset.
    covariance : ndarray
        Parameter covariance (sigma-inflated, plus the PSF map's noise when the
        map has sigmas and its interpolation error), order as
        :func:`fisher_information`.
    deviance : float
        Poisson deviance of the final model.
    pearson_chi2_reduced : float
        Pearson chi^2 / dof (about 1 when the model explains the data).
    deviance_by_k : tuple of float
        Best deviance with 0, 1, ... spins (model-selection trail).
    n_points : int
        Valid raster points used.
    density : xarray.DataArray
        The deconvolved map used for the initial guesses.
    search_box : ndarray (3, 2)
        Offset box actually searched (prior box cut to PSF-map coverage).
    line_shift_hz : float
        Fitted shift of the dark-spin line centre (prior: the spectrum fit).
    line : FlipLine
        The dark-spin line the rasters were fitted with: the spectrum's, its T2*
        fitted with the spins (prior: the spectrum fit; :func:`.spinmodel.widened`).
    line_t2_star_sigma_s : float
        That T2*'s sigma, s.
    layer_scale : (float, float)
        With a layer background: its fitted scale s and sigma (the layer's
        density as the spin rasters see it, in units of the background's),
        fitted jointly with the spins; (1, 0) without one.
    """

    spins: tuple[SpinFit, ...]
    nuisance: NDArray
    covariance: NDArray
    deviance: float
    pearson_chi2_reduced: float
    deviance_by_k: tuple[float, ...]
    n_points: int
    density: xr.DataArray = field(repr=False)
    search_box: NDArray = field(default_factory=lambda: PRIOR_BOX.copy())
    line_shift_hz: float = 0.0
    layer_scale: tuple[float, float] = (1.0, 0.0)
    line: FlipLine | None = None
    line_t2_star_sigma_s: float = float("nan")


def _coupling(offset: NDArray, w: float, sw: float, tau: float, axis: NDArray,
              hint: CouplingFit | None) -> tuple[float, float, float, NDArray]:
    geo = float(physics.dipolar_coupling(offset, axis))
    branches = physics.couplings_from_weight(w, tau, 8)
    sign = 1.0 if geo >= 0 else -1.0
    if hint is not None:
        return sign * hint.nu_hz, hint.nu_sigma_hz, geo, branches
    nu = float(branches[np.argmin(np.abs(branches - abs(geo)))])
    slope = abs(np.pi * tau * np.sin(np.pi * nu * tau))
    # near w = 2 the slope vanishes: the quadratic term bounds the sigma instead
    sig = sw / slope if slope > 0 else np.inf
    sig = min(sig, np.sqrt(2.0 * sw) / (np.pi * tau))
    return sign * nu, float(sig), geo, branches


def _resolution(psf: DarkSpinPSF, tips: NDArray, offset: NDArray
                ) -> tuple[tuple[float, float], tuple[float, float]]:
    pts = tips - offset
    v = np.nan_to_num(psf(pts))
    if v.max() <= 0:
        nan = (float("nan"), float("nan"))
        return nan, nan
    sel = v >= 0.5 * v.max()
    lat, ver = psf.slice_widths(pts[sel])
    wts = v[sel]

    def stat(a: NDArray) -> tuple[float, float]:
        ok = np.isfinite(a)
        if not ok.any():
            return float("nan"), float("nan")
        m = float(np.average(a[ok], weights=wts[ok]))
        return m, float(np.sqrt(np.average((a[ok] - m) ** 2, weights=wts[ok])))

    return stat(lat), stat(ver)


def _fit_no_spin(rasters: Sequence[_Raster], box: NDArray, line: FlipLine) -> PoissonFit:
    """The fit without spins: nuisances started from the counts, no line shift, and the
    layer's scale 1 when there is a background."""
    nuis0 = []
    for r in rasters:
        a0, c0, e0 = initial_nuisance(r.counts, r.shots)
        nuis0 += [a0, c0, float(np.median(e0))]
    return _fit(rasters, np.r_[nuis0, 0.0, 0.0, [1.0] if _has_layer(rasters) else []], box,
                line)


def _spin_fits(rasters: Sequence[_Raster], lay: _Layout, theta: NDArray, sig: NDArray,
               box: NDArray, ax: NDArray, coupling_hint: CouplingFit | None,
               gains: Sequence[float]) -> list[SpinFit]:
    """Every fitted spin's :class:`SpinFit` (in the fit's order) from the optimum ``theta``
    and its sigmas ``sig``; ``gains`` are the deviance drops as the spins were added."""
    tau = rasters[0].tau_s
    spins = lay.spins(theta)
    line = widened(rasters[0].psf.line, float(theta[lay.width]))    # the fitted width
    fits = []
    for j in range(lay.n_spins):
        base = lay.n_global + 4 * j
        off, soff = spins[j, :3].copy(), sig[base:base + 3].copy()
        w, sw = float(spins[j, 3]), float(sig[base + 3])
        nu, snu, geo, branches = _coupling(off, w, sw, tau, ax,
                                           coupling_hint if lay.n_spins == 1 else None)
        lat, ver = min((_resolution(replace(r.psf, line=line), r.tips, off) for r in rasters),
                       key=lambda res: np.nan_to_num(res[0][0], nan=np.inf))
        edge = 1e-6 * np.maximum(1.0, np.abs(box).max(axis=1))
        at_bound = (np.abs(off - box[:, 0]) <= edge) | (np.abs(off - box[:, 1]) <= edge)
        fits.append(SpinFit(offset_nm=off, offset_sigma_nm=soff, weight=w, weight_sigma=sw,
                            coupling_hz=nu, coupling_sigma_hz=snu, coupling_geometric_hz=geo,
                            coupling_branches_hz=branches, resolution_lateral_nm=lat,
                            resolution_vertical_nm=ver, delta_deviance=float(gains[j]),
                            at_bound=at_bound))
    return fits


def _gridded(sets: Sequence[xr.Dataset]) -> int:
    """Index of the first dataset on a tip grid (dims ``x``, ``y``, ``z``), not a list of
    points: the fit's starts are deconvolved from it."""
    for i, d in enumerate(sets):
        if all(a in d.dims for a in ("x", "y", "z")):
            return i
    raise NvmriError("localisation needs one DEER raster on a tip grid (its deconvolution "
                     "starts the fit); got only lists of points")


def localize_spins(deer: xr.Dataset | Sequence[xr.Dataset], detuning: DetuningInterpolant,
                   line: FlipLine, *, prior: ArrayLike = PRIOR_BOX, max_spins: int = 3,
                   axis: ArrayLike | None = None,
                   min_delta_deviance: float = MIN_DELTA_DEVIANCE,
                   min_weight_snr: float = 5.0, n_starts: int = 3, dz_step: float = 0.5,
                   coupling_hint: CouplingFit | None = None) -> LocalizationResult:
    """Localise point dark spins relative to the NV from DEER rasters.

    Parameters
    ----------
    deer : xarray.Dataset or sequence of them
        DEER rasters: coords ``x``, ``y``, ``z`` (nm), counts ``signal``,
        ``echo``, ``bright``, ``dark``, attrs ``tau_s``, ``rf_frequency_hz``,
        ``shots``.  Several rasters (e.g. different RF offsets) are fitted
        jointly; they must share ``tau_s`` (one w per spin).  A dataset may
        also be a list of points (any tips, repeats allowed: counts along one
        dimension, ``x``, ``y``, ``z`` coordinates along it, shots per point
        in a ``shots`` variable or ``attrs``); at least one must be on a grid
        (the first such one starts the fit).
    detuning : DetuningInterpolant
        The measured Delta f_dark map (:func:`~.detuning.dark_detuning_map`).
    line : FlipLine
        Tip-free dark-spin line (:func:`~.lines.fit_deer_spectrum`); its centre
        sigma enters as a Gaussian prior on a fitted line shift, so the
        offsets' sigmas include it.
    prior : array_like, (3, 2)
        Offset box searched, nm; cut to where the PSF map covers every t - r'.
    max_spins : int
    axis : array_like (3,), optional
        B0 / NV axis for the geometric coupling (default physics.Instrument's).
    min_delta_deviance, min_weight_snr : float
        Model-selection thresholds (module doc).
    n_starts : int
        Deconvolution peaks tried as starts for the first spin (2 for later ones).
    dz_step : float
        Object-plane spacing of the deconvolution, nm.
    coupling_hint : CouplingFit, optional
        Tip-free |nu| measurement (single spin) to report as the coupling.

    Returns
    -------
    LocalizationResult
    """
    sets = [deer] if isinstance(deer, xr.Dataset) else list(deer)
    if not sets:
        raise NvmriError("no DEER raster given")
    rasters = [_prepare(d, detuning, line) for d in sets]
    if len({r.tau_s for r in rasters}) > 1:
        raise NvmriError("joint localisation needs rasters with one tau_s")
    ax = physics.Instrument().nv_axis if axis is None else np.asarray(axis, float)
    box = feasible_offset_box(np.concatenate([r.tips for r in rasters]), detuning, prior)
    if np.any(box[:, 0] > box[:, 1]):
        raise NvmriError("the PSF map does not cover the DEER raster shifted by any offset "
                         "in the prior box; measure a larger PSF map")
    n_sets = len(rasters)
    layer = _has_layer(rasters)
    fit = _fit_no_spin(rasters, box, line)
    devs = [fit.deviance]
    lead = _gridded(sets)               # the starts come from a raster on a grid
    op = shift_operator(sets[lead], rasters[lead].psf, box, dz_step)

    def residual_starts(spins: NDArray, shift_hz: float, layer_scale: float, n_peaks: int
                        ) -> tuple[xr.DataArray, list[tuple[NDArray, float]]]:
        """The residual's deconvolution and the starts for one more spin: its peaks
        and the matched filter's best offsets."""
        c, s = _spin_contrast(sets[lead], rasters[lead], spins, shift_hz, layer_scale)
        source = _residual_density(sets[lead], rasters[lead], c, s, box, dz_step, op)
        return source, (_peaks(source, box, n_peaks)
                        + _matched_starts(rasters[lead], c, s, shift_hz, box, MATCHED_STARTS))

    density, starts = residual_starts(np.zeros((0, 4)), 0.0,
                                      _Layout(n_sets, 0, layer).layer_scale(fit.theta), n_starts)
    n_spins = 0
    gains: list[float] = []
    for _ in range(max_spins):
        best = None
        for pos, wsum in starts:
            th0 = np.r_[fit.theta, pos, float(np.clip(wsum, 0.2, 1.9))]
            trial = _fit(rasters, th0, box, line, max_iter=25)
            if best is None or trial.deviance < best.deviance:
                best = trial
        if best is None:
            break
        best = _fit(rasters, best.theta, box, line)
        cov = best.covariance(inflate=False)
        w_snr = best.theta[-1] / np.sqrt(max(cov[-1, -1], 1e-300))
        lay = _Layout(n_sets, n_spins + 1, layer)
        new = lay.spins(best.theta)
        dup = any(np.linalg.norm(new[-1, :3] - s[:3]) < 0.5 for s in new[:-1])
        if fit.deviance - best.deviance < min_delta_deviance or w_snr < min_weight_snr or dup:
            break
        gains.append(fit.deviance - best.deviance)
        fit, n_spins = best, n_spins + 1
        devs.append(fit.deviance)
        if n_spins < max_spins:
            _, starts = residual_starts(lay.spins(fit.theta), float(fit.theta[lay.shift]) * 1e6,
                                        lay.layer_scale(fit.theta), 2)

    lay = _Layout(n_sets, n_spins, layer)
    cov = fit.covariance(inflate=True)
    if n_spins:
        cov = cov + _map_covariance(rasters, fit.theta, fit.fisher, lay)
    sig = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    fitted_line = widened(line, float(fit.theta[lay.width]))
    fits = _spin_fits(rasters, lay, fit.theta, sig, box, ax, coupling_hint, gains)
    fits.sort(key=lambda f: -f.weight)
    return LocalizationResult(spins=tuple(fits), nuisance=lay.nuisance(fit.theta),
                              covariance=cov, deviance=fit.deviance,
                              pearson_chi2_reduced=fit.chi2_reduced, deviance_by_k=tuple(devs),
                              n_points=int(sum(r.tips.shape[0] for r in rasters)),
                              density=density, search_box=box,
                              line_shift_hz=float(fit.theta[lay.shift]) * 1e6,
                              layer_scale=(lay.layer_scale(fit.theta),
                                           float(sig[lay.scale]) if layer else 0.0),
                              line=fitted_line,
                              line_t2_star_sigma_s=fitted_line.t2_star_s * float(sig[lay.width]))


# --------------------------------------------------------------------------- #
# tip-free coupling
# --------------------------------------------------------------------------- #

def fit_deer_evolution(ds: xr.Dataset, coord: str = "tau", nu_max_hz: float = 20e6
                       ) -> CouplingFit:
    """|nu| of one coherently coupled spin from a tip-free DEER evolution.

    Model c(tau) = b + A (1 - cos(pi nu tau)), the single-spin DEER signal
    with flip probability A (physics.deer_coherence with p = A).  The
    frequency is located on a periodogram grid of the contrast (up to
    ``nu_max_hz``, limited by the sampling), then the four gates' counts are
    fitted by Poisson maximum likelihood with one echo coherence per tau
    (no echo-decay model), so the fading echo at long tau does not bias |nu|.

    Parameters
    ----------
    ds : xarray.Dataset
        Counts ``signal``, ``echo``, ``bright``, ``dark`` along ``coord``
        (free time, s); attrs ``shots``.
    coord : str
    nu_max_hz : float

    Returns
    -------
    CouplingFit
    """
    check_gates(ds)
    con = deer_contrast_dataset(ds)
    t_all = np.asarray(ds[coord].values, float)
    c, s = con["contrast"].values, con["contrast_sigma"].values
    ok = np.isfinite(c) & np.isfinite(s) & (s > 0)
    if ok.sum() < 6:
        raise NvmriError("DEER evolution has fewer than 6 valid points")
    best = periodogram_peak(t_all[ok], c[ok], s[ok], nu_max_hz)
    valid = valid_points(ds).values
    counts = np.stack([np.asarray(ds[g].values, float)[valid] for g in GATE_ORDER])
    shots = np.broadcast_to(np.asarray(ds.attrs.get("shots", 1.0), float), valid.shape)[valid]
    tv = t_all[valid]

    def model(th: NDArray) -> NDArray:
        return th[2] + th[1] * (1.0 - np.cos(np.pi * th[0] * 1e6 * tv))

    fit = fit_sweep(counts, shots, model, np.array([best[1] / 1e6, best[2], best[3]]),
                    np.array([0.0, -1.0, -1.0]), np.array([np.inf, 2.0, 1.0]),
                    np.array([1e-5, 1e-4, 1e-4]), echo_per_point=True)
    return CouplingFit(nu_hz=float(abs(fit.theta[0]) * 1e6),
                       nu_sigma_hz=float(fit.theta_sigma[0] * 1e6),
                       amplitude=float(fit.theta[1]), amplitude_sigma=float(fit.theta_sigma[1]),
                       chi2_reduced=fit.chi2_reduced)
