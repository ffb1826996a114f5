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
(``DetuningInterpolant.sigma``, :func:`~.detuning.dark_detuning_sigma`) and the
map's interpolation error.

Map noise: every node v_n of the map is one lock estimate with sigma s_n, and
the PSF uses the spline through them, linear in v.  A node error dv moves the
optimum by dtheta = -F^-1 J^T W G dv (first order; F the Fisher matrix with
the priors, J = dmu/dtheta, W = diag(1/mu), G = dmu/dv from the spline's node
weights, :meth:`~.detuning.DetuningInterpolant.node_weights`), so the sigmas add
C_map = A diag(s^2) A^T, A = -F^-1 J^T W G, to the counts' covariance
(:func:`_map_covariance`).  On the fine zoom raster a single node near the
imaged slice carries most of the lateral information, which the counts'
covariance alone cannot know.  The spline's interpolation error (a smooth,
deterministic bias of even a noise-free map: ~7 pm in dx for the Fig. 4 spin's
zoom raster, 0.6 of its counts-only sigma) enters as a systematic of the size
of its estimate, the quartic-minus-cubic spline difference
(:meth:`~.detuning.DetuningInterpolant.interpolation_error`), propagated the same
way (:func:`_map_covariance`).

Which spin starts the fit and how many are kept: :mod:`.localize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct._poisson import gate_means
from nvmri_bluesky.reconstruct.counts import check_gates, valid_points
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant
from nvmri_bluesky.reconstruct.lines import FlipLine
from nvmri_bluesky.reconstruct.protocol import PRIOR_DZ_NM, PRIOR_LATERAL_NM, SEARCH_MARGIN_NM
from nvmri_bluesky.reconstruct.psf import DarkSpinPSF

__all__ = ["PRIOR_BOX", "BACKGROUND", "GATE_ORDER", "LAYER_SCALE_MAX", "WIDTH_BOUND",
           "fisher_information", "shift_prior_mhz", "widened", "width_prior",
           "with_layer_background"]


PRIOR_BOX = np.array([[-PRIOR_LATERAL_NM, PRIOR_LATERAL_NM]] * 2 + [list(PRIOR_DZ_NM)]
                     ) + SEARCH_MARGIN_NM * np.array([-1.0, 1.0])
"""Default search box for spin offsets (spin - NV), [[dx], [dy], [dz]] nm: the
protocol's envelope grown by ``protocol.SEARCH_MARGIN_NM``, cut further where the
PSF map does not reach (:func:`~.psf.feasible_offset_box`)."""


_N_NUIS = 3          # per dataset: a (photons/shot), optical contrast C, echo E


GATE_ORDER = ("signal", "echo", "bright", "dark")


@dataclass(frozen=True)
class _Raster:
    """Valid points of one DEER dataset, flattened."""

    tips: NDArray          # (P, 3) nm
    counts: NDArray        # (4, P): signal, echo, bright, dark
    shots: NDArray         # (P,)
    psf: DarkSpinPSF
    tau_s: float
    background: NDArray    # (P,) known contrast of other sources (a layer), 0 if none


WIDTH_BOUND = 1.5
"""Bound of |g|, the raster fit's log line width relative to the spectrum's (a factor 4.5)."""


LAYER_SCALE_MAX = 5.0
"""Upper bound of the layer's scale in the joint spin fit (1: the layer image's density)."""


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
    ``layer``, a :class:`~.layer_fits.LayerFit`) on the raster, from the measured map
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
    for k in ("tau_s", "rf_frequency_hz") + (() if "shots" in ds.variables else ("shots",)):
        if k not in ds.attrs:
            raise NvmriError(f"DEER raster attrs lack {k!r}")
    d = ds.transpose(*[a for a in ("x", "y", "z") if a in ds["signal"].dims], ...)
    d = d.broadcast_like(d["signal"])
    ok = valid_points(d).values.ravel()
    gx, gy, gz = xr.broadcast(d["x"], d["y"], d["z"])
    gx, gy, gz = (g.transpose(*d["signal"].dims) for g in (gx, gy, gz))
    tips = np.stack([gx.values.ravel(), gy.values.ravel(), gz.values.ravel()], -1)[ok]
    counts = np.stack([np.asarray(d[g].values, float).ravel()[ok] for g in GATE_ORDER])
    if "shots" in d.variables:              # per point (a list of points, varying shots)
        shots = np.asarray(d["shots"].values, float).ravel()[ok]
    else:
        shots = np.broadcast_to(np.asarray(d.attrs["shots"], float), ok.shape)[ok]
    if tips.shape[0] < 10:
        raise NvmriError("DEER raster has fewer than 10 valid points")
    psf = DarkSpinPSF(detuning, line, float(d.attrs["rf_frequency_hz"]))
    background = (np.asarray(d[BACKGROUND].values, float).ravel()[ok] if BACKGROUND in d
                  else np.zeros(tips.shape[0]))
    return _Raster(tips, counts, np.asarray(shots, float), psf, float(d.attrs["tau_s"]),
                   np.nan_to_num(background))


def widened(line: FlipLine, log_width: float) -> FlipLine:
    """``line`` with its T2* multiplied by exp(-``log_width``): the line the raster fit uses.

    The raster fit's width parameter g is the log of the line width relative to
    the spectrum's, FWHM ~ 1/T2* -> exp(g) / T2* (:func:`width_prior`).
    """
    if log_width == 0.0:
        return line
    return replace(line, t2_star_s=line.t2_star_s * float(np.exp(-log_width)))


_WIDTH_STEP = 0.02   # central-difference step of g for dPSF/dg


def _contrast_and_grad(psf: DarkSpinPSF, tips: NDArray, spins: NDArray, shift_hz: float,
                       want_grad: bool, log_width: float = 0.0
                       ) -> tuple[NDArray, NDArray | None, NDArray | None, NDArray | None]:
    """c (P,), dc/d(spin params) (P, K, 4) [dx, dy, dz, w], dc/d(line shift) (P,) 1/Hz
    and dc/dg (P,), g the log line width (:func:`widened`).

    PSF_j = p_g(f_rf - f_dark0 - shift - Delta f_dark(t - r_j)).
    """
    k = spins.shape[0]
    p_n = tips.shape[0]
    if k == 0:
        return np.zeros(p_n), np.zeros((p_n, 0, 4)), np.zeros(p_n), np.zeros(p_n)
    line = widened(psf.line, log_width)
    off = psf.rf_offset_hz - shift_hz
    vals = np.empty((p_n, k))
    dvals = np.empty((p_n, k))
    wvals = np.empty((p_n, k))
    grads = np.empty((p_n, k, 3))
    if want_grad:
        up, down = (widened(psf.line, log_width + h) for h in (_WIDTH_STEP, -_WIDTH_STEP))
    for j in range(k):
        pts = tips - spins[j, :3]
        if want_grad:
            f, g = psf.detuning.value_and_gradient(pts)
            det = off - f
            dp = line.derivative(det)
            dvals[:, j] = -dp                                    # d PSF / d shift
            grads[:, j] = dp[:, None] * g                        # d PSF(t - r) / dr
            wvals[:, j] = (up.probability(det) - down.probability(det)) / (2 * _WIDTH_STEP)
        else:
            det = off - psf.detuning(pts)
        vals[:, j] = line.probability(det)
    vals = np.nan_to_num(vals)
    w = spins[:, 3]
    fac = 1.0 - w * vals                                         # (P, K)
    c = 1.0 - np.prod(fac, axis=1)
    if not want_grad:
        return c, None, None, None
    dvals, grads, wvals = np.nan_to_num(dvals), np.nan_to_num(grads), np.nan_to_num(wvals)
    others = np.empty_like(fac)
    for j in range(k):
        others[:, j] = np.prod(np.delete(fac, j, axis=1), axis=1)
    dc = np.empty((p_n, k, 4))
    dc[:, :, :3] = (others * w)[:, :, None] * grads
    dc[:, :, 3] = others * vals
    dshift = np.sum(others * w * dvals, axis=1)
    dwidth = np.sum(others * w * wvals, axis=1)
    return c, dc, dshift, dwidth


@dataclass(frozen=True)
class _Layout:
    """Parameter vector: per dataset (a, C, E), the line shift (MHz), the log line width g
    (:func:`widened`), with a background the layer's scale s (its image's -log(1 - b)
    times s: the layer's density as the spin rasters see it, fitted with the spins),
    then the spins."""

    n_sets: int
    n_spins: int
    layer: bool = False

    @classmethod
    def of(cls, theta: NDArray, n_sets: int, layer: bool) -> _Layout:
        """The layout of a parameter vector ``theta`` (its length gives the spins)."""
        return cls(n_sets, (theta.size - _N_NUIS * n_sets - 2 - int(layer)) // 4, layer)

    @property
    def n_global(self) -> int:
        return _N_NUIS * self.n_sets + 2 + int(self.layer)

    @property
    def scale(self) -> int:
        return _N_NUIS * self.n_sets + 2

    @property
    def shift(self) -> int:
        return _N_NUIS * self.n_sets

    @property
    def width(self) -> int:
        return _N_NUIS * self.n_sets + 1

    def priors(self, line: FlipLine) -> NDArray:
        """Gaussian prior sigmas (inf: none) of the spectrum-measured line: its shift and
        width (:func:`shift_prior_mhz`, :func:`width_prior`); priors' means are 0."""
        ps = np.full(self.n_global + 4 * self.n_spins, np.inf)
        ps[self.shift], ps[self.width] = shift_prior_mhz(line), width_prior(line)
        return ps

    def spins(self, theta: NDArray) -> NDArray:
        return theta[self.n_global:].reshape(-1, 4)

    def nuisance(self, theta: NDArray) -> NDArray:
        return theta[:_N_NUIS * self.n_sets].reshape(self.n_sets, _N_NUIS)

    def layer_scale(self, theta: NDArray) -> float:
        return float(theta[self.scale]) if self.layer else 1.0

    def bounds(self, box: NDArray) -> tuple[NDArray, NDArray]:
        extra = [0.0] if self.layer else []
        lo = np.r_[np.tile([1e-12, 0.0, 0.0], self.n_sets), -np.inf, -WIDTH_BOUND, extra,
                   np.tile(np.r_[box[:, 0], 0.0], self.n_spins)]
        hi = np.r_[np.tile([np.inf, 1.0, 1.0], self.n_sets), np.inf, WIDTH_BOUND,
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
        shift, g = theta[lay.shift] * 1e6, float(theta[lay.width])
        scale = lay.layer_scale(theta)
        mus, jacs = [], []
        for i, r in enumerate(rasters):
            a, copt, e = nuis[i]
            c, dc, dshift, dwidth = _contrast_and_grad(r.psf, r.tips, spins, shift, want, g)
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
                jac[0, :, lay.width] = dmu_dc * dwidth
                if lay.layer:
                    jac[0, :, lay.scale] = dmu_ds
                if lay.n_spins:
                    jac[0, :, lay.n_global:] = (dmu_dc[:, None, None] * dc).reshape(
                        sizes[i], 4 * lay.n_spins)
                jacs.append(jac.reshape(4 * sizes[i], theta.size))
        return np.concatenate(mus), (np.concatenate(jacs) if want else None)

    return fun


def _map_sensitivity(r: _Raster, spins: NDArray, shift_hz: float, line: FlipLine
                     ) -> tuple[NDArray, NDArray]:
    """The raster's contrast against the map: per node and along the interpolation error.

    PSF_j = p(off - shift - Delta f(t - r_j)) (p: ``line``, the fitted width) and
    Delta f = sum_n K_n v_n, so
    dc/dv_n = sum_j [prod_{l != j} (1 - w_l PSF_l)] w_j (-p'_j) K_n(t - r_j);
    the same with K_n replaced by the estimated interpolation error e(t - r_j)
    (:meth:`~.detuning.DetuningInterpolant.interpolation_error`) is the change of c
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
        vals.append(np.nan_to_num(line.probability(det_j)))
        dvals.append(np.nan_to_num(-line.derivative(det_j)))
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
    (:meth:`~.detuning.DetuningInterpolant.interpolation_error`).

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
    shift, g = float(theta[lay.shift]) * 1e6, float(theta[lay.width])
    scale = lay.layer_scale(theta)
    b = np.zeros((theta.size, sigma.size))
    b_err = np.zeros(theta.size)
    start = 0
    for i, r in enumerate(rasters):
        p_n = r.tips.shape[0]
        a, copt, e = lay.nuisance(theta)[i]
        c = _contrast_and_grad(r.psf, r.tips, spins, shift, False, g)[0]
        keep = np.clip(1.0 - r.background, 1e-12, 1.0) ** scale      # as in _model_fn
        dmu_dc = gate_means(r.shots, a, copt, e, 1.0 - keep * (1.0 - c))[4] * keep
        dc_dv, dc_err = _map_sensitivity(r, spins, shift, widened(r.psf.line, g))
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


def fisher_information(ds: xr.Dataset | Sequence[xr.Dataset], detuning: DetuningInterpolant,
                       line: FlipLine, offsets_nm: ArrayLike, weights: ArrayLike,
                       photons_per_shot: float, contrast: float, echo: float) -> NDArray:
    """Poisson Fisher information of the raster model at given parameters.

    Parameter order: per dataset (a, C, E), the line shift (MHz), the log line
    width g (:func:`widened`), then per spin (dx, dy, dz, w).  The spectrum's
    priors on the line (``line.centre_sigma_hz``, ``line.t2_star_sigma_s``; 0
    holds a quantity fixed) are added on the diagonal, as in the fit; the
    inverse is the Cramer-Rao bound the localisation's sigmas estimate.

    Returns
    -------
    ndarray, (3 n_datasets + 2 + 4 K, same)
    """
    sets = [ds] if isinstance(ds, xr.Dataset) else list(ds)
    rasters = [_prepare(d, detuning, line) for d in sets]
    spins = np.column_stack([np.atleast_2d(offsets_nm), np.atleast_1d(weights)])
    lay = _Layout(len(sets), spins.shape[0])
    theta = np.r_[np.tile([photons_per_shot, contrast, echo], len(sets)), 0.0, 0.0,
                  spins.ravel()]
    mu, jac = _model_fn(rasters, lay)(theta, True)
    fisher = jac.T @ (jac / np.maximum(mu, 1e-12)[:, None])
    return fisher + np.diag(lay.priors(line) ** -2.0)


def shift_prior_mhz(line: FlipLine) -> float:
    """Sigma (MHz) of the Gaussian prior on the line shift: the spectrum fit's centre sigma.

    A line given without uncertainty (0) is held fixed (1e-9 MHz).
    """
    return line.centre_sigma_hz / 1e6 if line.centre_sigma_hz > 0 else 1e-9


def width_prior(line: FlipLine) -> float:
    """Sigma of the Gaussian prior on g, the log line width: the spectrum's relative
    T2* sigma (dg = dT2* / T2*).

    The rasters see the line's width on every ring's flanks (on seed 4's stored
    rasters the deviance profile over T2* fixes it to ~3 %, the spectrum to
    ~20 %), so the width is fitted with the spins, not held at the spectrum's.
    A line given without uncertainty (0) is held fixed (1e-9).
    """
    return line.t2_star_sigma_s / line.t2_star_s if line.t2_star_sigma_s > 0 else 1e-9


def _has_layer(rasters: Sequence[_Raster]) -> bool:
    return any(bool(np.any(r.background > 0)) for r in rasters)
