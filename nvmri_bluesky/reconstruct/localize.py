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
inflated by sqrt(Pearson chi^2 / dof) when that exceeds 1 (model mismatch).

Initial guesses need no prior knowledge of where spins are: the contrast map
is deconvolved (Richardson-Lucy with the discrepancy stop,
:func:`~nvmri_bluesky.reconstruct.deconvolve.richardson_lucy_operator`) onto a
3D offset grid (the raster's lateral step, ``dz_step`` vertically) spanning the
prior box; its strongest local maxima are fit starts.

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
reported as the PSF-weighted mean and standard deviation over the slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage, optimize

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.counts import check_gates, deer_contrast_dataset, valid_points
from nvmri_bluesky.reconstruct.deconvolve import ShiftOperator, richardson_lucy_operator
from nvmri_bluesky.reconstruct.psf import (
    DarkSpinPSF,
    DetuningInterpolant,
    FlipLine,
    feasible_offset_box,
)

__all__ = [
    "PRIOR_BOX", "SpinFit", "LocalizationResult", "localize_spins", "deconvolve_deer",
    "spin_model_counts", "fisher_information", "fit_deer_evolution", "CouplingFit",
]

PRIOR_BOX = np.array([[-8.0, 8.0], [-8.0, 8.0], [-6.0, 2.0]])
"""Default search box for spin offsets (spin - NV), [[dx], [dy], [dz]] nm."""

_N_NUIS = 3          # per dataset: a (photons/shot), a*C, E


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
    counts = np.stack([np.asarray(d[g].values, float).ravel()[ok]
                       for g in ("signal", "echo", "bright", "dark")])
    shots = np.broadcast_to(np.asarray(d.attrs["shots"], float), ok.shape)[ok]
    if "shots" in d.data_vars:
        shots = np.asarray(d["shots"].values, float).ravel()[ok]
    if tips.shape[0] < 10:
        raise NvmriError("DEER raster has fewer than 10 valid points")
    psf = DarkSpinPSF(detuning, line, float(d.attrs["rf_frequency_hz"]))
    return _Raster(tips, counts, np.asarray(shots, float), psf, float(d.attrs["tau_s"]))


# --------------------------------------------------------------------------- #
# forward model and Jacobian
# --------------------------------------------------------------------------- #

def _contrast_and_grad(psf: DarkSpinPSF, tips: NDArray, spins: NDArray, want_grad: bool
                       ) -> tuple[NDArray, NDArray | None]:
    """c (P,) and dc/d(spin params) (P, K, 4) [dx, dy, dz, w]."""
    k = spins.shape[0]
    p_n = tips.shape[0]
    if k == 0:
        return np.zeros(p_n), np.zeros((p_n, 0, 4)) if want_grad else None
    vals = np.empty((p_n, k))
    grads = np.empty((p_n, k, 3))
    for j in range(k):
        pts = tips - spins[j, :3]
        if want_grad:
            v, g = psf.value_and_gradient(pts)
            grads[:, j] = -g                                # d PSF(t - r)/dr
        else:
            v = psf(pts)
        vals[:, j] = v
    vals = np.nan_to_num(vals)
    grads = np.nan_to_num(grads)
    w = spins[:, 3]
    fac = 1.0 - w * vals                                     # (P, K)
    prod = np.prod(fac, axis=1)
    c = 1.0 - prod
    if not want_grad:
        return c, None
    others = np.empty_like(fac)
    for j in range(k):
        others[:, j] = np.prod(np.delete(fac, j, axis=1), axis=1)
    dc = np.empty((p_n, k, 4))
    dc[:, :, :3] = (others * w)[:, :, None] * grads
    dc[:, :, 3] = others * vals
    return c, dc


def _mu_and_jac(r: _Raster, nuis: NDArray, spins: NDArray, want_jac: bool
                ) -> tuple[NDArray, NDArray | None, NDArray]:
    """Mean counts (4, P), Jacobian (4, P, 3 + 4K) and contrast (P,)."""
    a, ac, e = nuis
    n = r.shots
    c, dc = _contrast_and_grad(r.psf, r.tips, spins, want_jac)
    mu = np.empty((4, n.size))
    mu[2] = n * a
    mu[3] = n * (a - ac)
    mu[1] = n * (a - ac * (1.0 - e) / 2.0)
    mu[0] = n * (a - ac * (1.0 - e * (1.0 - c)) / 2.0)
    if not want_jac:
        return mu, None, c
    k = spins.shape[0]
    jac = np.zeros((4, n.size, _N_NUIS + 4 * k))
    jac[2, :, 0] = n
    jac[3, :, 0], jac[3, :, 1] = n, -n
    jac[1, :, 0], jac[1, :, 1], jac[1, :, 2] = n, -n * (1.0 - e) / 2.0, n * ac / 2.0
    jac[0, :, 0] = n
    jac[0, :, 1] = -n * (1.0 - e * (1.0 - c)) / 2.0
    jac[0, :, 2] = n * ac * (1.0 - c) / 2.0
    if k:
        jac[0, :, _N_NUIS:] = ((-n * ac * e / 2.0)[:, None, None] * dc).reshape(n.size, 4 * k)
    return mu, jac, c


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
        ``signal``, ``echo``, ``bright``, ``dark`` means and ``contrast`` on the
        raster's dims.
    """
    d = ds.transpose("x", "y", "z", ...)
    gx, gy, gz = xr.broadcast(d["x"], d["y"], d["z"])
    tips = np.stack([gx.values, gy.values, gz.values], -1)
    shape = tips.shape[:-1]
    psf = DarkSpinPSF(detuning, line, float(ds.attrs["rf_frequency_hz"]))
    r = _Raster(tips.reshape(-1, 3), np.zeros((4, tips[..., 0].size)),
                np.full(tips[..., 0].size, float(ds.attrs["shots"])), psf,
                float(ds.attrs["tau_s"]))
    spins = np.column_stack([np.atleast_2d(offsets_nm), np.atleast_1d(weights)])
    mu, _, c = _mu_and_jac(r, np.array([photons_per_shot, photons_per_shot * contrast, echo]),
                           spins, False)
    dims = ("x", "y", "z")
    out = {g: (dims, mu[i].reshape(shape)) for i, g in
           enumerate(("signal", "echo", "bright", "dark"))}
    out["contrast"] = (dims, c.reshape(shape))
    return xr.Dataset(out, coords={a: d[a] for a in dims})


def _split(theta: NDArray, n_sets: int) -> tuple[NDArray, NDArray]:
    nuis = theta[:_N_NUIS * n_sets].reshape(n_sets, _N_NUIS)
    spins = theta[_N_NUIS * n_sets:].reshape(-1, 4)
    return nuis, spins


def _deviance_and_fisher(rasters: Sequence[_Raster], theta: NDArray, want: bool
                         ) -> tuple[float, NDArray | None, NDArray | None, float]:
    """Poisson deviance, Fisher matrix, score and Pearson chi^2."""
    nuis, spins = _split(theta, len(rasters))
    k = spins.shape[0]
    n_par = theta.size
    dev, pear = 0.0, 0.0
    fisher = np.zeros((n_par, n_par)) if want else None
    score = np.zeros(n_par) if want else None
    for i, r in enumerate(rasters):
        mu, jac, _ = _mu_and_jac(r, nuis[i], spins, want)
        mu = np.maximum(mu, 1e-9)
        y = r.counts
        with np.errstate(divide="ignore", invalid="ignore"):
            term = np.where(y > 0, y * np.log(y / mu), 0.0) - (y - mu)
        dev += 2.0 * float(term.sum())
        pear += float(np.sum((y - mu) ** 2 / mu))
        if want:
            idx = np.r_[np.arange(_N_NUIS * i, _N_NUIS * (i + 1)),
                        _N_NUIS * len(rasters) + np.arange(4 * k)].astype(int)
            j2 = jac.reshape(-1, _N_NUIS + 4 * k)
            wts = 1.0 / mu.reshape(-1)
            fisher[np.ix_(idx, idx)] += j2.T @ (j2 * wts[:, None])
            score[idx] += j2.T @ ((y - mu).reshape(-1) * wts)
    return dev, fisher, score, pear


def fisher_information(ds: xr.Dataset | Sequence[xr.Dataset], detuning: DetuningInterpolant,
                       line: FlipLine, offsets_nm: ArrayLike, weights: ArrayLike,
                       photons_per_shot: float, contrast: float, echo: float) -> NDArray:
    """Poisson Fisher information of the raster model at given parameters.

    Parameter order: per dataset (a, a C, E), then per spin (dx, dy, dz, w).
    Its inverse is the Cramer-Rao bound the localisation's sigmas estimate.

    Returns
    -------
    ndarray, (3 n_datasets + 4 K, 3 n_datasets + 4 K)
    """
    sets = [ds] if isinstance(ds, xr.Dataset) else list(ds)
    rasters = [_prepare(d, detuning, line) for d in sets]
    spins = np.column_stack([np.atleast_2d(offsets_nm), np.atleast_1d(weights)])
    nuis = np.tile([photons_per_shot, photons_per_shot * contrast, echo], len(sets))
    theta = np.r_[nuis, spins.ravel()]
    return _deviance_and_fisher(rasters, theta, True)[1]


# --------------------------------------------------------------------------- #
# the fit
# --------------------------------------------------------------------------- #

def _bounds(n_sets: int, k: int, box: NDArray) -> tuple[NDArray, NDArray]:
    lo = np.tile([1e-9, 0.0, 0.0], n_sets)
    hi = np.tile([np.inf, np.inf, 1.0], n_sets)
    slo = np.tile(np.r_[box[:, 0], 0.0], k)
    shi = np.tile(np.r_[box[:, 1], 2.0], k)
    return np.r_[lo, slo], np.r_[hi, shi]


def _fit(rasters: Sequence[_Raster], theta0: NDArray, box: NDArray, max_iter: int = 200
         ) -> tuple[NDArray, float, NDArray, float]:
    """Poisson ML by Fisher scoring + Levenberg-Marquardt; returns theta, dev, F, pearson."""
    n_sets = len(rasters)
    k = (theta0.size - _N_NUIS * n_sets) // 4
    lo, hi = _bounds(n_sets, k, box)
    theta = np.clip(theta0, lo, hi)
    dev, fisher, score, pear = _deviance_and_fisher(rasters, theta, True)
    lam = 1e-3
    for _ in range(max_iter):
        diag = np.diag(fisher).copy()
        diag[diag <= 0] = 1.0
        improved = False
        for _ in range(30):
            try:
                step = np.linalg.solve(fisher + lam * np.diag(diag), score)
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            trial = np.clip(theta + step, lo, hi)
            dev_t = _deviance_and_fisher(rasters, trial, False)[0]
            if dev_t <= dev:
                improved = True
                break
            lam *= 4.0
        if not improved:
            break
        change = dev - dev_t
        moved = trial - theta
        theta = trial
        dev, fisher, score, pear = _deviance_and_fisher(rasters, theta, True)
        lam = max(lam / 5.0, 1e-9)
        try:
            sig = np.sqrt(np.abs(np.diag(np.linalg.inv(fisher))))
            rel = float(np.max(np.abs(moved) / np.where(sig > 0, sig, np.inf)))
        except np.linalg.LinAlgError:
            rel = np.inf
        if change < 1e-3 or rel < 1e-3:
            break
    return theta, dev, fisher, pear


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


def deconvolve_deer(ds: xr.Dataset, psf: DarkSpinPSF, box: ArrayLike = PRIOR_BOX,
                    dz_step: float = 0.5, contrast: ArrayLike | None = None,
                    sigma: ArrayLike | None = None, max_iter: int = 200) -> xr.DataArray:
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

    Returns
    -------
    xarray.DataArray
        Dims ``dx``, ``dy``, ``dz`` (nm); a spin of weight w shows as a peak of
        integral ~ w.  attrs ``rl_iterations``, ``rl_chi2``.
    """
    d = ds.transpose("x", "y", "z", ...)
    x0, hx = _lattice_axis(d["x"].values)
    y0, hy = _lattice_axis(d["y"].values)
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
    b = np.asarray(box, float)
    kx = max(int(np.ceil(max(abs(b[0, 0]), abs(b[0, 1])) / hx)), 1)
    ky = max(int(np.ceil(max(abs(b[1, 0]), abs(b[1, 1])) / hy)), 1)
    nz = max(int(round((b[2, 1] - b[2, 0]) / dz_step)) + 1, 1)
    z_obj = np.linspace(b[2, 0], b[2, 1], nz)
    op = ShiftOperator.build(psf, d["x"].values, d["y"].values, d["z"].values, kx, ky, z_obj)
    res = richardson_lucy_operator(c, op, sigma=s, max_iter=max_iter)
    out = xr.DataArray(res.image, dims=("dx", "dy", "dz"),
                       coords={"dx": np.arange(-kx, kx + 1) * hx,
                               "dy": np.arange(-ky, ky + 1) * hy, "dz": z_obj},
                       name="spin_density",
                       attrs={"rl_iterations": res.num_iter, "rl_chi2": res.chi2,
                              "units": "w per voxel"})
    for a in ("dx", "dy", "dz"):
        out[a].attrs["units"] = "nm"
    return out


def _peaks(obj: xr.DataArray, box: NDArray, n: int, min_sep_nm: float = 1.5
           ) -> list[tuple[NDArray, float]]:
    """Strongest local maxima of a density (offset, integrated weight) inside ``box``."""
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
        Parameter covariance (sigma-inflated), order as :func:`fisher_information`.
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
                   axis: ArrayLike | None = None, min_delta_deviance: float = 40.0,
                   min_weight_snr: float = 5.0, n_starts: int = 4, dz_step: float = 0.5,
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
        Tip-free dark-spin line (:func:`~.psf.fit_deer_spectrum`).
    prior : array_like, (3, 2)
        Offset box searched, nm; cut to where the PSF map covers every t - r'.
    max_spins : int
    axis : array_like (3,), optional
        B0 / NV axis for the geometric coupling (default physics.Instrument's).
    min_delta_deviance, min_weight_snr : float
        Model-selection thresholds (module doc).
    n_starts : int
        Deconvolution peaks tried as starts for each added spin.
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
    taus = {r.tau_s for r in rasters}
    if len(taus) > 1:
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
        b, d_, e_ = (float(np.sum(r.counts[i]) / np.sum(r.shots)) for i in (2, 3, 1))
        nuis0.append([b, max(b - d_, 1e-9), np.clip((2 * e_ - b - d_) / max(b - d_, 1e-12),
                                                   0.05, 1.0)])
    theta = np.array(nuis0, float).ravel()
    theta, dev, fisher, pear = _fit(rasters, theta, box)
    devs = [dev]
    density = deconvolve_deer(sets[0], rasters[0].psf, box, dz_step)
    residual_source = density
    spins = np.zeros((0, 4))
    for _k in range(max_spins):
        starts = _peaks(residual_source, box, n_starts)
        best = None
        for pos, wsum in starts:
            w0 = float(np.clip(wsum, 0.2, 1.9))
            th0 = np.r_[theta, pos, w0]
            th, dv, fi, pe = _fit(rasters, th0, box)
            if best is None or dv < best[1]:
                best = (th, dv, fi, pe)
        if best is None:
            break
        th, dv, fi, pe = best
        try:
            cov = np.linalg.inv(fi)
            w_snr = th[-1] / np.sqrt(max(cov[-1, -1], 1e-300))
        except np.linalg.LinAlgError:
            w_snr = 0.0
        new = th[-4:-1]
        dup = any(np.linalg.norm(new - s[:3]) < 0.5 for s in spins)
        if dev - dv < min_delta_deviance or w_snr < min_weight_snr or dup:
            break
        theta, dev, fisher, pear = th, dv, fi, pe
        devs.append(dev)
        spins = _split(theta, n_sets)[1]
        # residual contrast of the first raster for the next start
        r0 = rasters[0]
        c_model = _contrast_and_grad(r0.psf, r0.tips, spins, False)[0]
        con = deer_contrast_dataset(sets[0].transpose("x", "y", "z", ...))
        c_data = con["contrast"].transpose("x", "y", "z").values
        resid = np.full(c_data.shape, np.nan)
        ok = valid_points(sets[0].transpose("x", "y", "z", ...)).transpose(
            "x", "y", "z").values
        resid[ok] = c_data[ok] - c_model
        residual_source = deconvolve_deer(
            sets[0], r0.psf, box, dz_step, contrast=resid,
            sigma=con["contrast_sigma"].transpose("x", "y", "z").values)

    n_points = int(sum(r.tips.shape[0] for r in rasters))
    n_obs = 4 * n_points
    dof = max(n_obs - theta.size, 1)
    chi2r = pear / dof
    try:
        cov = np.linalg.inv(fisher) * max(chi2r, 1.0)
    except np.linalg.LinAlgError:
        cov = np.full((theta.size, theta.size), np.nan)
    nuis, spins = _split(theta, n_sets)
    sig = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    fits = []
    for j in range(spins.shape[0]):
        base = _N_NUIS * n_sets + 4 * j
        off, soff = spins[j, :3], sig[base:base + 3]
        w, sw = float(spins[j, 3]), float(sig[base + 3])
        nu, snu, geo, branches = _coupling(off, w, sw, tau, ax,
                                           coupling_hint if spins.shape[0] == 1 else None)
        lat, ver = _resolution(rasters[0].psf, rasters[0].tips, off)
        fits.append(SpinFit(offset_nm=off.copy(), offset_sigma_nm=soff.copy(), weight=w,
                            weight_sigma=sw, coupling_hz=nu, coupling_sigma_hz=snu,
                            coupling_geometric_hz=geo, coupling_branches_hz=branches,
                            resolution_lateral_nm=lat, resolution_vertical_nm=ver))
    fits.sort(key=lambda s: -s.weight)
    return LocalizationResult(spins=tuple(fits), nuisance=nuis, covariance=cov, deviance=dev,
                              pearson_chi2_reduced=float(chi2r), deviance_by_k=tuple(devs),
                              n_points=n_points, density=density, search_box=box)


# --------------------------------------------------------------------------- #
# tip-free coupling
# --------------------------------------------------------------------------- #

def fit_deer_evolution(ds: xr.Dataset, coord: str = "tau", nu_max_hz: float = 5e6
                       ) -> CouplingFit:
    """|nu| of one coherently coupled spin from a tip-free DEER evolution.

    Model c(tau) = b + A (1 - cos(pi nu tau)), the single-spin DEER signal
    with flip probability A (physics.deer_coherence, p_j = A).  The frequency
    is first located on a periodogram grid (up to ``nu_max_hz``, limited by
    the sampling), then refined by weighted least squares.

    Parameters
    ----------
    ds : xarray.Dataset
        Counts along ``coord`` (free time, s).
    coord : str
    nu_max_hz : float

    Returns
    -------
    CouplingFit
    """
    con = deer_contrast_dataset(ds)
    t = np.asarray(ds[coord].values, float)
    c, s = con["contrast"].values, con["contrast_sigma"].values
    ok = np.isfinite(c) & np.isfinite(s) & (s > 0)
    t, c, s = t[ok], c[ok], s[ok]
    if t.size < 6:
        raise NvmriError("DEER evolution has fewer than 6 valid points")
    dt = np.min(np.diff(np.sort(t))) if t.size > 1 else t[0]
    nu_hi = min(nu_max_hz, 1.0 / max(dt, 1e-12))
    grid = np.linspace(nu_hi / 4000.0, nu_hi, 4000)
    best = (np.inf, 0.0, 0.0, 0.0)
    wts = 1.0 / s**2
    for nu in grid:
        basis = np.column_stack([np.ones_like(t), 1.0 - np.cos(np.pi * nu * t)])
        coef, *_ = np.linalg.lstsq(basis * np.sqrt(wts)[:, None], c * np.sqrt(wts), rcond=None)
        chi = float(np.sum(wts * (c - basis @ coef) ** 2))
        if chi < best[0]:
            best = (chi, nu, coef[1], coef[0])

    def model(tt, nu, a, b):
        return b + a * (1.0 - np.cos(np.pi * nu * tt))

    popt, pcov = optimize.curve_fit(model, t, c, p0=[best[1], best[2], best[3]], sigma=s,
                                    absolute_sigma=True, maxfev=20000)
    chi2 = float(np.sum(((c - model(t, *popt)) / s) ** 2) / max(t.size - 3, 1))
    err = np.sqrt(np.diag(pcov)) * np.sqrt(max(chi2, 1.0))
    return CouplingFit(nu_hz=float(abs(popt[0])), nu_sigma_hz=float(err[0]),
                       amplitude=float(popt[1]), amplitude_sigma=float(err[1]),
                       chi2_reduced=chi2)
