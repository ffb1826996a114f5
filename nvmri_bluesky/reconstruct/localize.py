"""Point dark spins: 3D offsets from the NV, couplings and resolution from DEER rasters.

Forward model (physics.md, "Imaging model and the PSF"): a dark spin j at
offset r_j' from the NV is resonant at tip position t when the measured
NV-frame PSF is resonant at t - r_j', so per raster point

    c(t) = 1 - prod_j [1 - w_j PSF(t - r_j')],   w_j = 1 - cos(pi nu_j tau),

and the four gates' mean counts (shots N; per-shot brightness a, optical
contrast C and echo coherence E are fitted nuisances, one set per dataset)

    bright = N a,  dark = N a (1 - C),
    echo   = N a (1 - C (1 - E) / 2),
    signal = N a (1 - C (1 - E (1 - c)) / 2).

Noise model: independent Poisson counts.  The fit is the Poisson maximum
likelihood over *all* gates of all points (Fisher scoring with
Levenberg-Marquardt damping and box bounds); uncertainties are the inverse
Fisher information at the optimum (the Cramer-Rao bound of this model),
inflated by sqrt(Pearson chi^2 / dof) when that exceeds 1 (model mismatch),
plus the measured PSF map's own noise when the map carries it
(``DetuningInterpolant.sigma``, :func:`~.psf.dark_detuning_sigma`) and the
map's interpolation error.

Map noise: every node v_n of the map is one lock estimate with sigma s_n, and
the PSF uses the spline through them, linear in v.  A node error dv moves the
optimum by dtheta = -F^-1 J^T W G dv (first order; F the Fisher matrix with
the priors, J = dmu/dtheta, W = diag(1/mu), G = dmu/dv from the spline's node
weights, :meth:`~.psf.DetuningInterpolant.node_weights`), so the sigmas add
C_map = A diag(s^2) A^T, A = -F^-1 J^T W G, to the counts' covariance
(:func:`_map_covariance`).  On the fine zoom raster a single node near the
imaged slice carries most of the lateral information, which the counts'
covariance alone cannot know.  The spline's interpolation error (a smooth,
deterministic bias of even a noise-free map: ~7 pm in dx for the Fig. 4 spin's
zoom raster, 0.6 of its counts-only sigma) enters as a systematic of the size
of its estimate, the quartic-minus-cubic spline difference
(:meth:`~.psf.DetuningInterpolant.interpolation_error`), propagated the same
way (:func:`_map_covariance`).

Initial guesses need no prior knowledge of where spins are: the contrast map
is deconvolved (Richardson-Lucy with the discrepancy stop,
:func:`~nvmri_bluesky.reconstruct.deconvolve.richardson_lucy_operator`) onto a
3D offset grid (the raster's lateral step, ``dz_step`` vertically) spanning the
prior box; its strongest local maxima are fit starts.  So are the best offsets
of a matched filter over the same box (:func:`_matched_starts`): for one more
spin at r the contrast gains w PSF(t - r), linear in w, so the chi^2 it can
remove from the residual contrast is known in closed form at every r of a grid.
The deconvolution can miss a spin whose ring a known background (a layer's
image) overlaps: seed 29 of ``nvmri validate``, a 141 kHz spin at (7.54,
-1.51, 1.01) nm under a 0.76 /nm^2 layer, gave only peaks at the box's edges
(best fit 2 delta log L = 21), while the matched filter's best offset was
(7.41, -1.48, 0.86) and the fit from it gave 290.

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
FWHM_f / |d Delta f_dark/dz| (vertical), FWHM_f the measured line width;
reported as the PSF-weighted mean and standard deviation over the slice, in
the raster that images the spin with the finest lateral slice (with several
rasters, e.g. the protocol's zoom raster at a lower apex).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct._poisson import (
    PoissonFit,
    fit_sweep,
    gate_means,
    initial_nuisance,
    poisson_ml,
)
from nvmri_bluesky.reconstruct.counts import check_gates, deer_contrast_dataset, valid_points
from nvmri_bluesky.reconstruct.deconvolve import (
    PointOperator,
    RichardsonLucyResult,
    ShiftOperator,
    richardson_lucy_operator,
)
from nvmri_bluesky.reconstruct.evidence import periodogram_peak
from nvmri_bluesky.reconstruct.protocol import PRIOR_DZ_NM, PRIOR_LATERAL_NM, SEARCH_MARGIN_NM
from nvmri_bluesky.reconstruct.psf import (
    DarkSpinPSF,
    DetuningInterpolant,
    FlipLine,
    feasible_offset_box,
)

__all__ = [
    "PRIOR_BOX", "SpinFit", "LocalizationResult", "localize_spins", "deconvolve_deer",
    "shift_operator",
    "spin_model_counts", "fisher_information", "fit_deer_evolution", "CouplingFit",
    "with_layer_background", "fine_density",
]

PRIOR_BOX = np.array([[-PRIOR_LATERAL_NM, PRIOR_LATERAL_NM]] * 2 + [list(PRIOR_DZ_NM)]
                     ) + SEARCH_MARGIN_NM * np.array([-1.0, 1.0])
"""Default search box for spin offsets (spin - NV), [[dx], [dy], [dz]] nm: the
protocol's envelope grown by ``protocol.SEARCH_MARGIN_NM``, cut further where the
PSF map does not reach (:func:`~.psf.feasible_offset_box`)."""

_N_NUIS = 3          # per dataset: a (photons/shot), optical contrast C, echo E
GATE_ORDER = ("signal", "echo", "bright", "dark")


# --------------------------------------------------------------------------- #
# data preparation
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class _Raster:
    """Valid points of one DEER dataset, flattened."""

    tips: NDArray          # (P, 3) nm
    counts: NDArray        # (4, P): signal, echo, bright, dark
    shots: NDArray         # (P,)
    psf: DarkSpinPSF
    tau_s: float
    background: NDArray    # (P,) known contrast of other sources (a layer), 0 if none


LAYER_SCALE_MAX = 5.0
"""Upper bound of the layer's scale in the joint spin fit (1: the layer image's density)."""
MIN_DELTA_DEVIANCE = 40.0
"""Deviance drop (2 delta log L) a spin must bring to be kept (module doc)."""
BACKGROUND = "background_contrast"
"""Optional data variable of a DEER raster: the contrast of a source already fitted
(e.g. a layer's expected image); the spins' coherence multiplies its 1 - c."""


class _EitherMap:
    """Delta f_dark from a first map, from a second where the first does not reach."""

    def __init__(self, first: DetuningInterpolant, second: DetuningInterpolant) -> None:
        self.first, self.second = first, second

    def __call__(self, points: ArrayLike) -> NDArray:
        f = self.first(points)
        miss = ~np.isfinite(f)
        if miss.any():
            f = np.where(miss, self.second(points), f)
        return f


def with_layer_background(deer: xr.Dataset, detuning: DetuningInterpolant, line: FlipLine,
                          layer: object, fallback: DetuningInterpolant | None = None
                          ) -> xr.Dataset:
    """A spin raster with a fitted layer's expected contrast as its :data:`BACKGROUND`.

    The layer's expected image (``layers.layer_contrast``, height and density of
    ``layer``, a :class:`~.layers.LayerFit`) on the raster, from the measured map
    ``detuning`` (and ``fallback``, e.g. the layer's own PSF map, where the
    layer plane's t - r' leaves it).
    """
    from nvmri_bluesky.reconstruct.layers import layer_contrast

    d = deer.transpose("x", "y", "z", ...)
    det = detuning if fallback is None else _EitherMap(detuning, fallback)
    psf = DarkSpinPSF(det, line, float(d.attrs["rf_frequency_hz"]))
    c = layer_contrast(psf, d["x"].values, d["y"].values, np.atleast_1d(d["z"].values),
                       layer.height_nm, layer.density_per_nm2, float(d.attrs["tau_s"]))
    return d.assign({BACKGROUND: (("x", "y", "z"), c)})


def _prepare(ds: xr.Dataset, detuning: DetuningInterpolant, line: FlipLine) -> _Raster:
    check_gates(ds)
    for a in ("x", "y", "z"):
        if a not in ds.coords:
            raise NvmriError(f"DEER raster lacks the coordinate {a!r}")
    for k in ("tau_s", "rf_frequency_hz", "shots"):
        if k not in ds.attrs:
            raise NvmriError(f"DEER raster attrs lack {k!r}")
    d = ds.transpose(*[a for a in ("x", "y", "z") if a in ds["signal"].dims], ...)
    d = d.broadcast_like(d["signal"])
    ok = valid_points(d).values.ravel()
    gx, gy, gz = xr.broadcast(d["x"], d["y"], d["z"])
    gx, gy, gz = (g.transpose(*d["signal"].dims) for g in (gx, gy, gz))
    tips = np.stack([gx.values.ravel(), gy.values.ravel(), gz.values.ravel()], -1)[ok]
    counts = np.stack([np.asarray(d[g].values, float).ravel()[ok] for g in GATE_ORDER])
    shots = np.broadcast_to(np.asarray(d.attrs["shots"], float), ok.shape)[ok]
    if "shots" in d.data_vars:
        shots = np.asarray(d["shots"].values, float).ravel()[ok]
    if tips.shape[0] < 10:
        raise NvmriError("DEER raster has fewer than 10 valid points")
    psf = DarkSpinPSF(detuning, line, float(d.attrs["rf_frequency_hz"]))
    background = (np.asarray(d[BACKGROUND].values, float).ravel()[ok] if BACKGROUND in d
                  else np.zeros(tips.shape[0]))
    return _Raster(tips, counts, np.asarray(shots, float), psf, float(d.attrs["tau_s"]),
                   np.nan_to_num(background))


# --------------------------------------------------------------------------- #
# forward model and Jacobian
# --------------------------------------------------------------------------- #

def _contrast_and_grad(psf: DarkSpinPSF, tips: NDArray, spins: NDArray, shift_hz: float,
                       want_grad: bool) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """c (P,), dc/d(spin params) (P, K, 4) [dx, dy, dz, w] and dc/d(line shift) (P,) 1/Hz.

    PSF_j = p(f_rf - f_dark0 - shift - Delta f_dark(t - r_j)).
    """
    k = spins.shape[0]
    p_n = tips.shape[0]
    if k == 0:
        return np.zeros(p_n), np.zeros((p_n, 0, 4)), np.zeros(p_n)
    off = psf.rf_offset_hz - shift_hz
    vals = np.empty((p_n, k))
    dvals = np.empty((p_n, k))
    grads = np.empty((p_n, k, 3))
    for j in range(k):
        pts = tips - spins[j, :3]
        if want_grad:
            f, g = psf.detuning.value_and_gradient(pts)
            det = off - f
            dp = psf.line.derivative(det)
            dvals[:, j] = -dp                                    # d PSF / d shift
            grads[:, j] = dp[:, None] * g                        # d PSF(t - r) / dr
        else:
            det = off - psf.detuning(pts)
        vals[:, j] = psf.line.probability(det)
    vals = np.nan_to_num(vals)
    w = spins[:, 3]
    fac = 1.0 - w * vals                                         # (P, K)
    c = 1.0 - np.prod(fac, axis=1)
    if not want_grad:
        return c, None, None
    dvals, grads = np.nan_to_num(dvals), np.nan_to_num(grads)
    others = np.empty_like(fac)
    for j in range(k):
        others[:, j] = np.prod(np.delete(fac, j, axis=1), axis=1)
    dc = np.empty((p_n, k, 4))
    dc[:, :, :3] = (others * w)[:, :, None] * grads
    dc[:, :, 3] = others * vals
    dshift = np.sum(others * w * dvals, axis=1)
    return c, dc, dshift


@dataclass(frozen=True)
class _Layout:
    """Parameter vector: per dataset (a, C, E), the line shift (MHz), with a background
    the layer's scale s (its image's -log(1 - b) times s: the layer's density as the
    spin rasters see it, fitted with the spins), then the spins."""

    n_sets: int
    n_spins: int
    layer: bool = False

    @property
    def n_global(self) -> int:
        return _N_NUIS * self.n_sets + 1 + int(self.layer)

    @property
    def scale(self) -> int:
        return _N_NUIS * self.n_sets + 1

    @property
    def shift(self) -> int:
        return _N_NUIS * self.n_sets

    def spins(self, theta: NDArray) -> NDArray:
        return theta[self.n_global:].reshape(-1, 4)

    def nuisance(self, theta: NDArray) -> NDArray:
        return theta[:_N_NUIS * self.n_sets].reshape(self.n_sets, _N_NUIS)

    def layer_scale(self, theta: NDArray) -> float:
        return float(theta[self.scale]) if self.layer else 1.0

    def bounds(self, box: NDArray) -> tuple[NDArray, NDArray]:
        extra = [0.0] if self.layer else []
        lo = np.r_[np.tile([1e-12, 0.0, 0.0], self.n_sets), -np.inf, extra,
                   np.tile(np.r_[box[:, 0], 0.0], self.n_spins)]
        hi = np.r_[np.tile([np.inf, 1.0, 1.0], self.n_sets), np.inf,
                   [LAYER_SCALE_MAX] if self.layer else [],
                   np.tile(np.r_[box[:, 1], 2.0], self.n_spins)]
        return lo, hi


def _model_fn(rasters: Sequence[_Raster], lay: _Layout):
    """``fun(theta, want_jac)`` for :func:`_poisson.poisson_ml` over all rasters' gates."""
    sizes = [r.tips.shape[0] for r in rasters]
    logs = [-np.log(np.clip(1.0 - r.background, 1e-12, 1.0)) for r in rasters]

    def fun(theta: NDArray, want: bool):
        nuis = lay.nuisance(theta)
        spins = lay.spins(theta)
        shift = theta[lay.shift] * 1e6
        scale = lay.layer_scale(theta)
        mus, jacs = [], []
        for i, r in enumerate(rasters):
            a, copt, e = nuis[i]
            c, dc, dshift = _contrast_and_grad(r.psf, r.tips, spins, shift, want)
            keep = np.exp(-scale * logs[i])                  # coherence the background leaves
            mu, da, dco, de, dmu_dc = gate_means(r.shots, a, copt, e, 1.0 - keep * (1.0 - c))
            if want and lay.layer:
                dmu_ds = dmu_dc * logs[i] * keep * (1.0 - c)
            dmu_dc = dmu_dc * keep
            mus.append(mu.ravel())
            if want:
                jac = np.zeros((4, sizes[i], theta.size))
                base = _N_NUIS * i
                jac[:, :, base], jac[:, :, base + 1], jac[:, :, base + 2] = da, dco, de
                jac[0, :, lay.shift] = dmu_dc * dshift * 1e6
                if lay.layer:
                    jac[0, :, lay.scale] = dmu_ds
                if lay.n_spins:
                    jac[0, :, lay.n_global:] = (dmu_dc[:, None, None] * dc).reshape(
                        sizes[i], 4 * lay.n_spins)
                jacs.append(jac.reshape(4 * sizes[i], theta.size))
        return np.concatenate(mus), (np.concatenate(jacs) if want else None)

    return fun


def _map_sensitivity(r: _Raster, spins: NDArray, shift_hz: float
                     ) -> tuple[NDArray, NDArray]:
    """The raster's contrast against the map: per node and along the interpolation error.

    PSF_j = p(off - shift - Delta f(t - r_j)) and Delta f = sum_n K_n v_n, so
    dc/dv_n = sum_j [prod_{l != j} (1 - w_l PSF_l)] w_j (-p'_j) K_n(t - r_j);
    the same with K_n replaced by the estimated interpolation error e(t - r_j)
    (:meth:`~.psf.DetuningInterpolant.interpolation_error`) is the change of c
    if the spline were off by e.

    Returns
    -------
    (dc_dv, dc_err) : ndarrays (P, n_nodes) in 1/Hz and (P,) dimensionless
    """
    det = r.psf.detuning
    n_nodes = int(np.prod(det.values.shape))
    p_n = r.tips.shape[0]
    out, along = np.zeros((p_n, n_nodes)), np.zeros(p_n)
    if spins.shape[0] == 0:
        return out, along
    off = r.psf.rf_offset_hz - shift_hz
    vals, dvals, weights, errs = [], [], [], []
    for j in range(spins.shape[0]):
        pts = r.tips - spins[j, :3]
        det_j = off - det(pts)
        vals.append(np.nan_to_num(r.psf.line.probability(det_j)))
        dvals.append(np.nan_to_num(-r.psf.line.derivative(det_j)))
        weights.append([np.nan_to_num(w) for w in det.node_weights(pts)])
        errs.append(np.nan_to_num(det.interpolation_error(pts)))
    fac = 1.0 - spins[:, 3][None, :] * np.stack(vals, -1)          # (P, K)
    for j in range(spins.shape[0]):
        others = np.prod(np.delete(fac, j, axis=1), axis=1)
        coef = others * spins[j, 3] * dvals[j]
        a, b, c = weights[j]
        out += (coef[:, None, None, None] * a[:, :, None, None] * b[:, None, :, None]
                * c[:, None, None, :]).reshape(p_n, n_nodes)
        along += coef * errs[j]
    return out, along


def _map_covariance(rasters: Sequence[_Raster], theta: NDArray, fisher: NDArray,
                    lay: _Layout) -> NDArray:
    """Parameter covariance from the PSF map, linearised at the optimum.

    Two terms: the nodes' noise, A diag(s^2) A^T with A = -F^-1 J^T W G
    (module doc; needs ``detuning.sigma``, else 0), and the spline's
    interpolation error as a systematic, d d^T with d = -F^-1 J^T W g_e, g_e
    the change of the means if the spline were off by its estimated error
    (:meth:`~.psf.DetuningInterpolant.interpolation_error`).

    Parameters
    ----------
    rasters : sequence of _Raster
        The fitted rasters (one PSF map).
    theta : ndarray (p,)
        Optimum, order as :func:`fisher_information`.
    fisher : ndarray (p, p)
        Fisher matrix at ``theta`` including the priors.
    lay : _Layout
        The fit's parameter layout (spins, and a layer scale if fitted).

    Returns
    -------
    ndarray (p, p)
        In theta's units.
    """
    node_sigma = rasters[0].psf.detuning.sigma
    sigma = (np.zeros(rasters[0].psf.detuning.values.size) if node_sigma is None
             else np.ravel(node_sigma))
    mu, jac = _model_fn(rasters, lay)(theta, True)
    spins = lay.spins(theta)
    shift = float(theta[lay.shift]) * 1e6
    scale = lay.layer_scale(theta)
    b = np.zeros((theta.size, sigma.size))
    b_err = np.zeros(theta.size)
    start = 0
    for i, r in enumerate(rasters):
        p_n = r.tips.shape[0]
        a, copt, e = lay.nuisance(theta)[i]
        c = _contrast_and_grad(r.psf, r.tips, spins, shift, False)[0]
        keep = np.clip(1.0 - r.background, 1e-12, 1.0) ** scale      # as in _model_fn
        dmu_dc = gate_means(r.shots, a, copt, e, 1.0 - keep * (1.0 - c))[4] * keep
        dc_dv, dc_err = _map_sensitivity(r, spins, shift)
        rows = slice(start, start + p_n)                                # signal: first P
        weight = 1.0 / np.maximum(mu[rows], 1e-12)
        if node_sigma is not None:
            b += jac[rows].T @ ((dmu_dc * weight)[:, None] * dc_dv)
        b_err += jac[rows].T @ (dmu_dc * weight * dc_err)
        start += 4 * p_n
    try:
        amat = np.linalg.solve(fisher, np.column_stack([b, b_err]))
    except np.linalg.LinAlgError:
        amat = np.linalg.pinv(fisher) @ np.column_stack([b, b_err])
    nodes, err = amat[:, :-1], amat[:, -1]
    return (nodes * sigma**2) @ nodes.T + np.outer(err, err)


def _observed(rasters: Sequence[_Raster]) -> NDArray:
    return np.concatenate([r.counts.ravel() for r in rasters])


def spin_model_counts(ds: xr.Dataset, detuning: DetuningInterpolant, line: FlipLine,
                      offsets_nm: ArrayLike, weights: ArrayLike, photons_per_shot: float,
                      contrast: float, echo: float) -> xr.Dataset:
    """Mean gate counts the forward model predicts on a raster (for checks and plots).

    Parameters
    ----------
    ds : xarray.Dataset
        Raster (coords and attrs as for :func:`localize_spins`; counts unused).
    detuning, line
        PSF ingredients.
    offsets_nm : array_like, (K, 3)
        Spin offsets from the NV, nm.
    weights : array_like, (K,)
        DEER weights w_j.
    photons_per_shot, contrast, echo : float
        Nuisances a, C, E.

    Returns
    -------
    xarray.Dataset
        ``signal``, ``echo``, ``bright``, ``dark`` means and ``contrast`` on
        (x, y, z).
    """
    d = ds.transpose("x", "y", "z", ...)
    gx, gy, gz = xr.broadcast(d["x"], d["y"], d["z"])
    tips = np.stack([gx.values, gy.values, gz.values], -1)
    shape = tips.shape[:-1]
    psf = DarkSpinPSF(detuning, line, float(ds.attrs["rf_frequency_hz"]))
    spins = np.column_stack([np.atleast_2d(offsets_nm), np.atleast_1d(weights)])
    c = _contrast_and_grad(psf, tips.reshape(-1, 3), spins, 0.0, False)[0]
    shots = np.full(c.size, float(ds.attrs["shots"]))
    mu = gate_means(shots, photons_per_shot, contrast, echo, c)[0]
    dims = ("x", "y", "z")
    out = {g: (dims, mu[i].reshape(shape)) for i, g in enumerate(GATE_ORDER)}
    out["contrast"] = (dims, c.reshape(shape))
    return xr.Dataset(out, coords={a: d[a] for a in dims})


def fisher_information(ds: xr.Dataset | Sequence[xr.Dataset], detuning: DetuningInterpolant,
                       line: FlipLine, offsets_nm: ArrayLike, weights: ArrayLike,
                       photons_per_shot: float, contrast: float, echo: float) -> NDArray:
    """Poisson Fisher information of the raster model at given parameters.

    Parameter order: per dataset (a, C, E), the line shift (MHz), then per
    spin (dx, dy, dz, w).  The line-centre prior (``line.centre_sigma_hz``;
    0 holds the line fixed) is added on the shift's diagonal, as in the fit;
    the inverse is the Cramer-Rao bound the localisation's sigmas estimate.

    Returns
    -------
    ndarray, (3 n_datasets + 1 + 4 K, same)
    """
    sets = [ds] if isinstance(ds, xr.Dataset) else list(ds)
    rasters = [_prepare(d, detuning, line) for d in sets]
    spins = np.column_stack([np.atleast_2d(offsets_nm), np.atleast_1d(weights)])
    lay = _Layout(len(sets), spins.shape[0])
    theta = np.r_[np.tile([photons_per_shot, contrast, echo], len(sets)), 0.0, spins.ravel()]
    mu, jac = _model_fn(rasters, lay)(theta, True)
    fisher = jac.T @ (jac / np.maximum(mu, 1e-12)[:, None])
    fisher[lay.shift, lay.shift] += 1.0 / _shift_prior_mhz(line) ** 2
    return fisher


# --------------------------------------------------------------------------- #
# the fit
# --------------------------------------------------------------------------- #

def _shift_prior_mhz(line: FlipLine) -> float:
    """Sigma (MHz) of the Gaussian prior on the line shift: the spectrum fit's centre sigma.

    A line given without uncertainty (0) is held fixed (1e-9 MHz).
    """
    return line.centre_sigma_hz / 1e6 if line.centre_sigma_hz > 0 else 1e-9


def _has_layer(rasters: Sequence[_Raster]) -> bool:
    return any(bool(np.any(r.background > 0)) for r in rasters)


def _fit(rasters: Sequence[_Raster], theta0: NDArray, box: NDArray, line: FlipLine,
         max_iter: int = 200) -> PoissonFit:
    layer = _has_layer(rasters)
    lay = _Layout(len(rasters), (theta0.size - _N_NUIS * len(rasters) - 1 - int(layer)) // 4,
                  layer)
    lo, hi = lay.bounds(box)
    ps = np.full(theta0.size, np.inf)
    ps[lay.shift] = _shift_prior_mhz(line)
    return poisson_ml(_model_fn(rasters, lay), _observed(rasters), theta0, lo, hi,
                      prior_mean=np.zeros(theta0.size), prior_sigma=ps, max_iter=max_iter)


# --------------------------------------------------------------------------- #
# deconvolution (initial guesses)
# --------------------------------------------------------------------------- #

def _lattice_axis(values: NDArray) -> tuple[float, float]:
    v = np.unique(np.asarray(values, float))
    if v.size < 2:
        return float(v[0]), 1.0
    steps = np.diff(v)
    if np.ptp(steps) > 1e-6 * max(abs(steps[0]), 1.0):
        raise NvmriError("deconvolution needs a raster with uniform lateral steps")
    return float(v[0]), float(steps[0])


def _object_grid(ds: xr.Dataset, box: ArrayLike, dz_step: float
                 ) -> tuple[int, int, NDArray, float, float]:
    d = ds.transpose("x", "y", "z", ...)
    hx = _lattice_axis(d["x"].values)[1]
    hy = _lattice_axis(d["y"].values)[1]
    b = np.asarray(box, float)
    kx = max(int(np.ceil(max(abs(b[0, 0]), abs(b[0, 1])) / hx)), 1)
    ky = max(int(np.ceil(max(abs(b[1, 0]), abs(b[1, 1])) / hy)), 1)
    nz = max(int(round((b[2, 1] - b[2, 0]) / dz_step)) + 1, 1)
    return kx, ky, np.linspace(b[2, 0], b[2, 1], nz), hx, hy


def deconvolve_deer(ds: xr.Dataset, psf: DarkSpinPSF, box: ArrayLike = PRIOR_BOX,
                    dz_step: float = 0.5, contrast: ArrayLike | None = None,
                    sigma: ArrayLike | None = None, max_iter: int = 60,
                    operator: ShiftOperator | None = None) -> xr.DataArray:
    """w-weighted spin density on an offset grid, by Richardson-Lucy.

    Parameters
    ----------
    ds : xarray.Dataset
        DEER raster (coords ``x``, ``y`` with uniform steps, ``z`` any planes;
        counts; attrs).
    psf : DarkSpinPSF
        PSF for the raster's RF frequency.
    box : array_like, (3, 2)
        Offset box to reconstruct [[dx], [dy], [dz]] nm.
    dz_step : float
        Vertical spacing of the object planes, nm (the lateral spacing is the
        raster's step).
    contrast, sigma : array_like, optional
        Map to deconvolve on the raster's (x, y, z) shape and its noise; by
        default the DEER contrast and its sigma propagated from the counts.
    max_iter : int
        Upper bound of the discrepancy-stopped RL.
    operator : ShiftOperator, optional
        A prebuilt operator for this raster, PSF, box and dz_step (reuse it
        for several maps of one raster); built here when omitted.

    Returns
    -------
    xarray.DataArray
        Dims ``dx``, ``dy``, ``dz`` (nm); a spin of weight w shows as a peak of
        integral ~ w.  attrs ``rl_iterations``, ``rl_chi2``.
    """
    d = ds.transpose("x", "y", "z", ...)
    kx, ky, z_obj, hx, hy = _object_grid(d, box, dz_step)
    if contrast is None:
        con = deer_contrast_dataset(d)
        contrast = con["contrast"].transpose("x", "y", "z").values
        sigma = con["contrast_sigma"].transpose("x", "y", "z").values
    c = np.asarray(contrast, float)
    s = None if sigma is None else np.asarray(sigma, float)
    bad = ~np.isfinite(c)
    if s is not None:
        bad |= ~np.isfinite(s)
        s = np.where(bad, np.inf, s)
    c = np.where(bad, 0.0, c)
    op = operator if operator is not None else shift_operator(d, psf, box, dz_step)
    res = richardson_lucy_operator(c, op, sigma=s, max_iter=max_iter)
    return _density(res, (np.arange(-kx, kx + 1) * hx, np.arange(-ky, ky + 1) * hy, z_obj))


def _density(res: RichardsonLucyResult, axes: Sequence[NDArray], **attrs: float
             ) -> xr.DataArray:
    """An RL result on offset axes (dx, dy, dz nm) as the density DataArray, w per voxel."""
    out = xr.DataArray(res.image, dims=("dx", "dy", "dz"),
                       coords=dict(zip(("dx", "dy", "dz"), axes, strict=True)),
                       name="spin_density",
                       attrs={"rl_iterations": res.num_iter, "rl_chi2": res.chi2, **attrs,
                              "units": "w per voxel"})
    for a in ("dx", "dy", "dz"):
        out[a].attrs["units"] = "nm"
    return out


def shift_operator(ds: xr.Dataset, psf: DarkSpinPSF, box: ArrayLike = PRIOR_BOX,
                   dz_step: float = 0.5, supersample: int = 2) -> ShiftOperator:
    """The raster's imaging operator from an offset grid (see :func:`deconvolve_deer`)."""
    d = ds.transpose("x", "y", "z", ...)
    kx, ky, z_obj, _, _ = _object_grid(d, box, dz_step)
    return ShiftOperator.build(psf, d["x"].values, d["y"].values,
                               np.atleast_1d(d["z"].values), kx, ky, z_obj,
                               supersample=supersample)


MATCHED_STARTS = 3
"""Fit starts from the matched filter per added spin (beside the deconvolution's peaks)."""
MATCHED_FILTER_BUDGET = 4e6
"""Offset-grid points x raster points a matched filter evaluates (about a second); the
grid step follows (at least 0.5 nm: ~0.6 nm over the prior box for a 400-point survey)."""


def _matched_starts(r0: _Raster, contrast: NDArray, sigma: NDArray, shift_hz: float,
                    box: NDArray, n: int, min_sep_nm: float = 1.5,
                    budget: float = MATCHED_FILTER_BUDGET) -> list[tuple[NDArray, float]]:
    """Starts for one more spin from a matched filter on the residual contrast.

    With residual contrast c_p and sigma s_p at ``r0.tips`` (:func:`_spin_contrast`,
    line shift ``shift_hz``), one more spin at r of weight w adds w g_p(r),
    g_p(r) = PSF(t_p - r), and removes

        chi^2 gain = <c, g>^2 / <g, g>  at  w = <c, g> / <g, g>  (w > 0),

    inner products weighted by 1 / s_p^2.  Evaluated on a regular grid over
    ``box``.

    Returns
    -------
    list of (offset (3,) nm, w)
        The ``n`` best offsets, each ``min_sep_nm`` from a better one.
    """
    ok = np.isfinite(contrast) & np.isfinite(sigma) & (sigma > 0)
    if not ok.any():
        return []
    tips, c, iv = r0.tips[ok], contrast[ok], 1.0 / sigma[ok] ** 2
    step = max(0.5, (float(np.prod(box[:, 1] - box[:, 0])) * len(tips) / budget) ** (1 / 3))
    axes = [np.linspace(lo, hi, max(2, int(round((hi - lo) / step)) + 1)) for lo, hi in box]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    off = r0.psf.rf_offset_hz - shift_hz
    gain, weight = np.zeros(len(grid)), np.zeros(len(grid))
    chunk = max(1, int(budget // 8 // len(tips)))
    for i in range(0, len(grid), chunk):
        g = grid[i:i + chunk]
        pts = (tips[None, :, :] - g[:, None, :]).reshape(-1, 3)
        psf = np.nan_to_num(r0.psf.line.probability(off - r0.psf.detuning(pts)))
        psf = psf.reshape(len(g), -1)
        cg, gg = psf @ (c * iv), (psf * psf) @ iv
        w = cg / np.maximum(gg, 1e-300)
        gain[i:i + chunk] = np.where(w > 0, cg * w, 0.0)
        weight[i:i + chunk] = w
    out: list[tuple[NDArray, float]] = []
    for j in np.argsort(gain)[::-1]:
        if gain[j] <= 0 or len(out) >= n:
            break
        if all(np.linalg.norm(grid[j] - q) >= min_sep_nm for q, _ in out):
            out.append((grid[j], float(weight[j])))
    return out


def _peaks(obj: xr.DataArray, box: NDArray, n: int, min_sep_nm: float = 1.5,
           min_relative: float = 0.25) -> list[tuple[NDArray, float]]:
    """Strongest local maxima of a density: (offset, integrated weight) inside ``box``.

    At most ``n``, each at least ``min_relative`` of the strongest (integrated
    over its 3x3x3 neighbourhood) and ``min_sep_nm`` from a stronger one.
    """
    v = np.asarray(obj.values, float)
    mx = ndimage.maximum_filter(v, size=3, mode="constant", cval=-np.inf)
    cand = np.argwhere((v == mx) & (v > 0))
    axes = [obj[a].values for a in ("dx", "dy", "dz")]
    order = np.argsort(v[tuple(cand.T)])[::-1]
    out: list[tuple[NDArray, float]] = []
    for i in order:
        idx = cand[i]
        sl = tuple(slice(max(j - 1, 0), j + 2) for j in idx)
        blk = v[sl]
        pos = []
        for ax in range(3):
            coords = axes[ax][sl[ax]]
            wsum = blk.sum(axis=tuple(a for a in range(3) if a != ax))
            pos.append(float(np.sum(coords * wsum) / max(wsum.sum(), 1e-300)))
        pos = np.clip(np.array(pos), box[:, 0], box[:, 1])
        if any(np.linalg.norm(pos - p) < min_sep_nm for p, _ in out):
            continue
        if out and blk.sum() < min_relative * out[0][1]:
            continue
        out.append((pos, float(blk.sum())))
        if len(out) >= n:
            break
    return out


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
        jointly; they must share ``tau_s`` (one w per spin).
    detuning : DetuningInterpolant
        The measured Delta f_dark map (:func:`~.psf.dark_detuning_map`).
    line : FlipLine
        Tip-free dark-spin line (:func:`~.psf.fit_deer_spectrum`); its centre
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
    tau = rasters[0].tau_s
    ax = physics.Instrument().nv_axis if axis is None else np.asarray(axis, float)
    box = feasible_offset_box(np.concatenate([r.tips for r in rasters]), detuning, prior)
    if np.any(box[:, 0] > box[:, 1]):
        raise NvmriError("the PSF map does not cover the DEER raster shifted by any offset "
                         "in the prior box; measure a larger PSF map")
    n_sets = len(rasters)
    nuis0 = []
    for r in rasters:
        a0, c0, e0 = initial_nuisance(r.counts, r.shots)
        nuis0 += [a0, c0, float(np.median(e0))]
    layer = _has_layer(rasters)
    fit = _fit(rasters, np.r_[nuis0, 0.0, [1.0] if layer else []], box, line)
    devs = [fit.deviance]
    op = shift_operator(sets[0], rasters[0].psf, box, dz_step)

    def residual_starts(spins: NDArray, shift_hz: float, layer_scale: float, n_peaks: int
                        ) -> tuple[xr.DataArray, list[tuple[NDArray, float]]]:
        """The residual's deconvolution and the starts for one more spin: its peaks
        and the matched filter's best offsets."""
        c, s = _spin_contrast(sets[0], rasters[0], spins, shift_hz, layer_scale)
        source = _residual_density(sets[0], rasters[0], c, s, box, dz_step, op)
        return source, (_peaks(source, box, n_peaks)
                        + _matched_starts(rasters[0], c, s, shift_hz, box, MATCHED_STARTS))

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
    spins = lay.spins(fit.theta)
    fits = []
    for j in range(n_spins):
        base = lay.n_global + 4 * j
        off, soff = spins[j, :3].copy(), sig[base:base + 3].copy()
        w, sw = float(spins[j, 3]), float(sig[base + 3])
        nu, snu, geo, branches = _coupling(off, w, sw, tau, ax,
                                           coupling_hint if n_spins == 1 else None)
        lat, ver = min((_resolution(r.psf, r.tips, off) for r in rasters),
                       key=lambda res: np.nan_to_num(res[0][0], nan=np.inf))
        edge = 1e-6 * np.maximum(1.0, np.abs(box).max(axis=1))
        at_bound = (np.abs(off - box[:, 0]) <= edge) | (np.abs(off - box[:, 1]) <= edge)
        fits.append(SpinFit(offset_nm=off, offset_sigma_nm=soff, weight=w, weight_sigma=sw,
                            coupling_hz=nu, coupling_sigma_hz=snu, coupling_geometric_hz=geo,
                            coupling_branches_hz=branches, resolution_lateral_nm=lat,
                            resolution_vertical_nm=ver, delta_deviance=float(gains[j]),
                            at_bound=at_bound))
    fits.sort(key=lambda f: -f.weight)
    return LocalizationResult(spins=tuple(fits), nuisance=lay.nuisance(fit.theta),
                              covariance=cov, deviance=fit.deviance,
                              pearson_chi2_reduced=fit.chi2_reduced, deviance_by_k=tuple(devs),
                              n_points=int(sum(r.tips.shape[0] for r in rasters)),
                              density=density, search_box=box,
                              line_shift_hz=float(fit.theta[lay.shift]) * 1e6,
                              layer_scale=(lay.layer_scale(fit.theta),
                                           float(sig[lay.scale]) if layer else 0.0))


def _spin_contrast(ds: xr.Dataset, r: _Raster, spins: NDArray, shift_hz: float,
                   layer_scale: float = 1.0) -> tuple[NDArray, NDArray]:
    """Contrast the given spins (and the known background) leave, at the valid points.

    With a background contrast b (a layer's expected image) the spins' own
    contrast is 1 - (1 - c) / (1 - b), its sigma scaled by 1 / (1 - b): a
    deconvolution then sees the spins' rings, not the layer's.

    Returns
    -------
    (contrast, sigma) : ndarrays (P,)
        In the order of ``r.tips`` (:func:`_prepare`); NaN where the counts
        give no contrast.
    """
    d = ds.transpose("x", "y", "z", ...)
    con = deer_contrast_dataset(d)
    ok = valid_points(d).transpose("x", "y", "z").values
    c_data = con["contrast"].transpose("x", "y", "z").values[ok]
    s_data = con["contrast_sigma"].transpose("x", "y", "z").values[ok]
    c_model = _contrast_and_grad(r.psf, r.tips, spins, shift_hz, False)[0]
    keep = np.clip(np.clip(1.0 - r.background, 1e-12, 1.0) ** layer_scale, 1e-3, 1.0)
    return 1.0 - (1.0 - c_data) / keep - c_model, s_data / keep


def _residual_density(ds: xr.Dataset, r0: _Raster, contrast: NDArray, sigma: NDArray,
                      box: NDArray, dz_step: float, op: ShiftOperator) -> xr.DataArray:
    """Deconvolution, on the raster's own offset grid, of the contrast the current spins
    (and the known background) leave (:func:`_spin_contrast`: ``contrast``, ``sigma``)."""
    d = ds.transpose("x", "y", "z", ...)
    ok = valid_points(d).transpose("x", "y", "z").values
    resid, sig = np.full(ok.shape, np.nan), np.full(ok.shape, np.inf)
    resid[ok], sig[ok] = contrast, sigma
    return deconvolve_deer(d, r0.psf, box, dz_step, contrast=resid, sigma=sig, operator=op)


def fine_density(deer: Sequence[xr.Dataset], detuning: DetuningInterpolant, line: FlipLine,
                 centre_nm: ArrayLike, half_width_nm: ArrayLike = (2.0, 2.0, 1.2),
                 step_nm: float = 0.2, *, spins: ArrayLike | None = None,
                 shift_hz: float = 0.0, layer_scale: float = 1.0, max_iter: int = 60
                 ) -> xr.DataArray:
    """w-weighted spin density on a fine voxel grid around a spin, from all rasters at once.

    Richardson-Lucy (discrepancy stop) with a :class:`~.deconvolve.PointOperator`
    over every valid point of every raster (any tips, no common lattice): the
    voxels are not tied to any raster's step, so the density shows the spin
    at the resolution the rasters' resonant slices give.  Rasters are
    prepared as for :func:`localize_spins`; a :data:`BACKGROUND` (layer) is
    divided out as in the localisation's deconvolution (:func:`_spin_contrast`).

    Parameters
    ----------
    deer : sequence of xarray.Dataset
        DEER rasters (as for :func:`localize_spins`).
    detuning, line
        PSF ingredients.
    centre_nm : array_like (3,)
        Box centre (e.g. a fitted spin offset), nm.
    half_width_nm : array_like (3,)
        Box half widths along dx, dy, dz, nm (the default box, 21 x 21 x 13
        voxels, costs ~0.8 s CPU for the ~1400 points of the Fig. 4 rasters).
    step_nm : float
        Voxel size, nm (all axes; the box is widened to whole voxels).
    spins : array_like (K, 4), optional
        Fitted spins [dx, dy, dz (nm), w]; those outside the box are
        subtracted from the data first (their rings are not the box's image).
    shift_hz : float
        The fit's line shift, for those spins' model contrast.
    layer_scale : float
        Scale of the background's density (the joint fit's ``layer_scale``).
    max_iter : int
        Upper bound of the RL iterations.

    Returns
    -------
    xarray.DataArray
        Dims ``dx``, ``dy``, ``dz`` (nm, voxel centres); w per voxel.  attrs
        ``rl_iterations``, ``rl_chi2``, ``step_nm``, ``n_points`` (points used).
    """
    c0, hw = np.asarray(centre_nm, float), np.asarray(half_width_nm, float)
    half = np.ceil(hw / step_nm - 1e-9).astype(int)
    axes = [c0[i] + np.arange(-half[i], half[i] + 1) * step_nm for i in range(3)]
    known = np.zeros((0, 4)) if spins is None else np.asarray(spins, float).reshape(-1, 4)
    inside = np.all(np.abs(known[:, :3] - c0) <= half * step_nm, axis=1)
    ops, ys, sigmas = [], [], []
    for ds in deer:
        r = _prepare(ds, detuning, line)
        op = PointOperator.build(r.psf.of_detuning, r.tips, *axes, smooth=detuning)
        y, s = _spin_contrast(ds, r, known[~inside], shift_hz, layer_scale)
        ops.append(op)
        ys.append(y[op.rows])
        sigmas.append(s[op.rows])
    y, s = np.concatenate(ys), np.concatenate(sigmas)
    bad = ~np.isfinite(y) | ~np.isfinite(s)
    res = richardson_lucy_operator(np.where(bad, 0.0, y), PointOperator.stack(ops),
                                   sigma=np.where(bad, np.inf, s), max_iter=max_iter)
    return _density(res, axes, step_nm=float(step_nm), n_points=int((~bad).sum()))


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
