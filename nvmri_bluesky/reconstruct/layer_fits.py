"""Dark-spin layers: height above the NV and areal density fitted to counts.

The expected-contrast model of a layer (a 2-D Poisson process of spins):
:mod:`.layers`.

A measured map is *one realisation*: near the NV only tens of spins matter,
so the data scatter about the expectation by more than photon noise.  The
fits below therefore report sigmas inflated by sqrt(Pearson chi^2 / dof),
and the decay fit adds the height's uncertainty to the density's.

Recommended use (the paper's): the height from the image (the resonant dome
is shifted by h; :func:`fit_layer_image`), the density from the tip-free
decay at that height (:func:`fit_layer_decay`, which samples ~ pi (1.5 h)^2 n
spins and so fluctuates least).  The image's own density is a cross-check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct._poisson import fit_sweep, gate_means, initial_nuisance, poisson_ml
from nvmri_bluesky.reconstruct.counts import check_gates, contrast_with_sigma, valid_points
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant
from nvmri_bluesky.reconstruct.layers import (
    _decay_quadrature,
    _lattice,
    _layer_adjoint,
    _layer_forward,
    _layer_geometry,
    _LayerGeometry,
    layer_decay_integral,
)
from nvmri_bluesky.reconstruct.lines import FlipLine
from nvmri_bluesky.reconstruct.psf import DarkSpinPSF

__all__ = ["LayerFit", "fit_layer_image", "fit_layer_decay"]


_GATES = ("signal", "echo", "bright", "dark")


@dataclass(frozen=True)
class LayerFit:
    """A layer's height above the NV and areal density with one-sigma errors.

    Attributes
    ----------
    height_nm, height_sigma_nm : float
    density_per_nm2, density_sigma_per_nm2 : float
    chi2_reduced : float
        Pearson chi^2 / dof of the count fit (> 1: realisation scatter).
    method : str
        ``"image"`` or ``"decay"``.
    profile : ndarray (k, 2), optional
        (height, deviance) scan of the image fit.
    delta_deviance : float
        Image fit: deviance without the layer (n = 0) minus with it (its evidence).
    at_bound : bool
        The height ended on (within half a coarse step of) its search range's end.
    """

    height_nm: float
    height_sigma_nm: float
    density_per_nm2: float
    density_sigma_per_nm2: float
    chi2_reduced: float
    method: str
    profile: NDArray | None = None
    delta_deviance: float = float("nan")
    at_bound: bool = False


def _raster_arrays(ds: xr.Dataset) -> tuple[NDArray, NDArray, NDArray, NDArray, NDArray, NDArray]:
    check_gates(ds)
    d = ds.transpose("x", "y", "z", ...)
    counts = np.stack([np.asarray(d[g].values, float) for g in _GATES])      # (4, nx, ny, nz)
    ok = valid_points(d).values
    shots = np.broadcast_to(np.asarray(d.attrs["shots"], float), ok.shape)
    return (np.asarray(d["x"].values, float), np.asarray(d["y"].values, float),
            np.atleast_1d(np.asarray(d["z"].values, float)), counts, ok, shots)


class _SplineErrorShifted:
    """Delta f_dark of a map plus its spline's estimated interpolation error, Hz."""

    def __init__(self, detuning: DetuningInterpolant) -> None:
        self.detuning = detuning

    @property
    def bounds(self) -> NDArray:
        return self.detuning.bounds

    def __call__(self, points: ArrayLike) -> NDArray:
        return self.detuning(points) + self.detuning.interpolation_error(points)


class _LayerImages:
    """The rasters of :func:`fit_layer_image` and the expected-image model on them."""

    def __init__(self, sets: Sequence[xr.Dataset], detuning: DetuningInterpolant,
                 line: FlipLine, axis: ArrayLike | None, rho_max_nm: float,
                 fine_nm: float) -> None:
        self.arrays = [_raster_arrays(d) for d in sets]
        self.psfs = [DarkSpinPSF(detuning, line, float(d.attrs["rf_frequency_hz"]))
                     for d in sets]
        self.taus = [float(d.attrs["tau_s"]) for d in sets]
        self.axis, self.r_max, self.fine_nm = axis, float(rho_max_nm), fine_nm
        self.obs = np.concatenate([a[3][:, a[4]].ravel() for a in self.arrays])
        self._cache: dict[float, list[_LayerGeometry]] = {}

    def geometries(self, psfs: Sequence[DarkSpinPSF], h: float) -> list[_LayerGeometry]:
        """The layer integrals' lattices of every raster at height ``h`` with ``psfs``."""
        return [_layer_geometry(p, a[0], a[1], a[2], h, t, self.axis, self.r_max, self.fine_nm)
                for p, a, t in zip(psfs, self.arrays, self.taus, strict=True)]

    def geoms(self, h: float) -> list[_LayerGeometry]:
        """:meth:`geometries` with the measured PSFs, remembered for the last few heights."""
        key = round(float(h), 6)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = self.geometries(self.psfs, h)
        return self._cache[key]

    def integrals(self, h: float) -> list[NDArray]:
        """I(t; h) at every raster's valid points."""
        return [_layer_forward(g)[a[4]] for g, a in zip(self.geoms(h), self.arrays, strict=True)]

    def fun_for(self, ints: list[NDArray], dints: list[NDArray] | None):
        """``fun(theta, want_jac)`` for :func:`_poisson.poisson_ml`: theta = (n, h, then
        a, C, E per raster); the h column of the Jacobian from ``dints`` (dI/dh) if given."""
        arrays = self.arrays

        def fun(th: NDArray, want: bool):
            n = th[0]
            mus, jacs = [], []
            for i, (a, integ) in enumerate(zip(arrays, ints, strict=True)):
                shots = a[5][a[4]]
                c = 1.0 - np.exp(-n * integ)
                mu, da, dco, de, dmu_dc = gate_means(shots, *th[2 + 3 * i:5 + 3 * i], c)
                mus.append(mu.ravel())
                if want:
                    jac = np.zeros((4, shots.size, th.size))
                    jac[0, :, 0] = dmu_dc * integ * np.exp(-n * integ)
                    if dints is not None:
                        jac[0, :, 1] = dmu_dc * n * dints[i] * np.exp(-n * integ)
                    jac[:, :, 2 + 3 * i], jac[:, :, 3 + 3 * i], jac[:, :, 4 + 3 * i] = da, dco, de
                    jacs.append(jac.reshape(4 * shots.size, th.size))
            return np.concatenate(mus), (np.concatenate(jacs) if want else None)
        return fun


def _profile_height(model: _LayerImages, theta0: NDArray, lo: NDArray, hi: NDArray,
                    fix_h: NDArray, heights_nm: tuple[float, float], coarse_step_nm: float
                    ) -> tuple[float, NDArray, list[tuple[float, float]]]:
    """The profile deviance's minimum over h: a coarse scan, then a bounded Brent search.

    Returns the best height, the fit's parameters there and every (h, deviance) profiled.
    """
    state = {"theta": theta0}
    scanned: list[tuple[float, float]] = []

    def profile(h: float) -> float:
        fit = poisson_ml(model.fun_for(model.integrals(h), None), model.obs, state["theta"],
                         lo, hi, prior_sigma=fix_h, prior_mean=np.zeros(lo.size))
        state["theta"] = fit.theta
        scanned.append((float(h), fit.deviance))
        return fit.deviance

    grid = np.arange(heights_nm[0], heights_nm[1] + 1e-9, coarse_step_nm)
    devs = np.array([profile(h) for h in grid])
    i0 = int(np.argmin(devs))
    a_lo, a_hi = grid[max(i0 - 1, 0)], grid[min(i0 + 1, grid.size - 1)]
    opt = optimize.minimize_scalar(profile, bounds=(a_lo, a_hi), method="bounded",
                                   options={"xatol": 0.01})
    h_best = float(opt.x)
    profile(h_best)
    return h_best, state["theta"], scanned


def _realisation_covariance(model: _LayerImages, h_best: float, theta: NDArray,
                            ints: list[NDArray], jac: NDArray, mu: NDArray, finv: NDArray
                            ) -> NDArray | None:
    """Covariance of (n, h) from the finite number of spins, by linear response
    (:func:`fit_layer_image`); None when no raster contributes."""
    arrays = model.arrays
    resp = finv[:2] @ (jac / mu[:, None]).T                   # (2, n_obs)
    start = 0
    gsum: list[NDArray] = []
    for i, (g, a) in enumerate(zip(model.geoms(h_best), arrays, strict=True)):
        m = int(a[4].sum())
        sig_rows = resp[:, start:start + m]                    # signal gate rows come first
        c_i = 1.0 - np.exp(-theta[0] * ints[i])
        dmu_dc = gate_means(a[5][a[4]], *theta[2 + 3 * i:5 + 3 * i], c_i)[4]
        coef = sig_rows * dmu_dc * np.exp(-theta[0] * ints[i])
        per_k = []
        for k in range(2):
            b = np.zeros(a[4].shape)
            b[a[4]] = coef[k]
            per_k.append(g.w * _layer_adjoint(g, b))
        start += 4 * m
        if gsum and gsum[0].shape == per_k[0].shape:
            gsum = [gsum[k] + per_k[k] for k in range(2)]
        else:
            gsum = per_k if not gsum else gsum
    if not gsum:
        return None
    g0 = model.geoms(h_best)[0]
    cell = (_lattice(arrays[0][0])[1] / g0.mx) * (_lattice(arrays[0][1])[1] / g0.my)
    return theta[0] * np.array([[np.sum(gsum[k] * gsum[m_]) / cell for m_ in range(2)]
                                for k in range(2)])


def fit_layer_image(deer: xr.Dataset | Sequence[xr.Dataset], detuning: DetuningInterpolant,
                    line: FlipLine, heights_nm: tuple[float, float] = (4.0, 18.0),
                    axis: ArrayLike | None = None, coarse_step_nm: float = 1.5,
                    rho_max_nm: float = 45.0, fine_nm: float = 0.5) -> LayerFit:
    """Height and density of a layer from DEER rasters (expected-image model).

    The Poisson deviance of all gates is profiled over h (coarse scan, then a
    bounded Brent search), with n and the nuisances (a, C, E per raster)
    fitted at each h.  Covariance of (n, h) = photon part (inverse Fisher,
    inflated by chi2_red > 1) + realisation part: to first order the
    estimates respond to the spins as sum_j G(r_j) with
    G(rho) = w(rho) sum_t b_t PSF(t - (rho, h)) (b: the estimator's linear
    response to the contrast at t), whose Poisson-process variance is
    n integral G^2 d^2 rho.  Plus the PSF map's spline interpolation error as a
    systematic: the optimum's linearised shift if Delta f_dark were off by the
    quartic-minus-cubic spline difference
    (:meth:`~.detuning.DetuningInterpolant.interpolation_error`).

    Parameters
    ----------
    deer : xarray.Dataset or sequence
        Rasters (uniform lateral steps; same lattice if several).
    detuning, line
        Measured PSF ingredients.
    heights_nm : (lo, hi)
        Range of layer heights above the NV searched, nm.
    axis : array_like (3,), optional
    coarse_step_nm : float
    rho_max_nm : float
        Layer disk radius integrated, nm (spins beyond ~2.5 h barely couple).
    fine_nm : float
        Integration step target, nm.  0.5 nm: the layer's resonant ring on the
        plane is thin (a deep NV's layer lies far below the dome top, where the
        lateral gradient is steep), and a 1 nm lattice aliases it: the profile
        deviance in h then has ~1-unit wiggles (local minima 0.25 nm apart) and
        the finite-difference dI/dh is wrong, so the height and its Fisher sigma
        are too (h = 15.3 nm: scatter 0.5 nm for a reported 0.2 nm).  0.5 nm
        agrees with 0.25 nm to 1 pm in h on that case.

    Returns
    -------
    LayerFit
    """
    sets = [deer] if isinstance(deer, xr.Dataset) else list(deer)
    model = _LayerImages(sets, detuning, line, axis, rho_max_nm, fine_nm)
    n_sets = len(sets)
    nuis0 = []
    for a in model.arrays:
        a0, copt0, e0 = initial_nuisance(a[3][:, a[4]], a[5][a[4]])
        nuis0 += [a0, copt0, float(np.median(e0))]
    lo = np.r_[0.0, -np.inf, np.tile([1e-12, 0.0, 0.0], n_sets)]
    hi = np.r_[np.inf, np.inf, np.tile([np.inf, 1.0, 1.0], n_sets)]
    fix_h = np.r_[np.inf, 1e-9, np.full(3 * n_sets, np.inf)]   # h is profiled, not fitted
    h_best, theta_h, scanned = _profile_height(model, np.r_[0.3, 0.0, nuis0], lo, hi, fix_h,
                                               heights_nm, coarse_step_nm)
    eps = 0.05
    ip, im = model.integrals(h_best + eps), model.integrals(h_best - eps)
    dints = [(p_ - m_) / (2 * eps) for p_, m_ in zip(ip, im, strict=True)]
    ints = model.integrals(h_best)
    fit = poisson_ml(model.fun_for(ints, None), model.obs, theta_h, lo, hi, prior_sigma=fix_h,
                     prior_mean=np.zeros(lo.size))
    # evidence: the same gates without the layer (n = 0, nuisances refitted)
    no_layer = poisson_ml(model.fun_for(ints, None), model.obs, np.r_[0.0, fit.theta[1:]], lo,
                          np.r_[0.0, hi[1:]], prior_sigma=fix_h, prior_mean=np.zeros(lo.size))
    theta = fit.theta
    mu, jac = model.fun_for(ints, dints)(theta, True)
    mu = np.maximum(mu, 1e-12)
    fisher = jac.T @ (jac / mu[:, None])
    chi2r = float(np.sum((model.obs - mu) ** 2 / mu) / max(model.obs.size - lo.size, 1))
    finv = np.linalg.pinv(fisher)
    cov = finv * max(chi2r, 1.0)
    real = _realisation_covariance(model, h_best, theta, ints, jac, mu, finv)
    if real is not None:
        cov[:2, :2] += real
    # the PSF map's spline interpolation error as a systematic (as localize does): the
    # optimum's first-order shift if Delta f_dark were off by its estimate, the quartic
    # minus the cubic spline; the zoom raster's height hangs on the dome top, where the
    # map's 12 x 8 nm spline errs most
    alt = [DarkSpinPSF(_SplineErrorShifted(detuning), line, p.rf_frequency_hz)
           for p in model.psfs]
    ints_alt = [_layer_forward(g)[a[4]]
                for g, a in zip(model.geometries(alt, h_best), model.arrays, strict=True)]
    mu_alt = np.maximum(model.fun_for(ints_alt, None)(theta, False)[0], 1e-12)
    shift = finv @ (jac.T @ ((mu_alt - mu) / mu))
    cov[:2, :2] += np.outer(shift[:2], shift[:2])
    prof = np.array(sorted(scanned))
    return LayerFit(height_nm=h_best, height_sigma_nm=float(np.sqrt(max(cov[1, 1], 0.0))),
                    density_per_nm2=float(theta[0]),
                    density_sigma_per_nm2=float(np.sqrt(max(cov[0, 0], 0.0))),
                    chi2_reduced=chi2r, method="image", profile=prof,
                    delta_deviance=float(no_layer.deviance - fit.deviance),
                    at_bound=bool(min(h_best - heights_nm[0], heights_nm[1] - h_best)
                                  < 0.5 * coarse_step_nm))


def fit_layer_decay(ds: xr.Dataset, height_nm: float, height_sigma_nm: float = 0.0,
                    flip_probability: float | None = None, line: FlipLine | None = None,
                    axis: ArrayLike | None = None, coord: str = "tau",
                    spin_couplings_hz: Sequence[float] = ()) -> LayerFit:
    """Areal density of a layer at a known height from a tip-free DEER evolution.

    Fits c(tau) = 1 - exp(-n p0 J(tau; h)) prod_k [1 - p0 (1 - cos(pi nu_k tau))]
    to the four gates' counts (Poisson ML, one echo coherence per tau): the
    joint model of the layer and the point spins already located on the same
    NV (couplings nu_k, flipped by the same RF pulse, so the same p0).  Without
    the spins' factor a spin's oscillation would be read as layer density
    (seed 1103, a 216 kHz spin under 0.86 spins/nm^2: +18 %).  sigma_n combines, in
    quadrature, the photon part (inflated by sqrt(chi2_red) > 1), the
    realisation part (the estimate responds to the spins as sum_j G(r_j) with
    G(rho) = sum_tau b_tau p0 [1 - cos(pi nu(rho) tau)], variance
    n integral G^2) and the height's, (dn/dh) sigma_h with dn/dh from refits
    at h +/- sigma_h.

    Parameters
    ----------
    ds : xarray.Dataset
        Counts along ``coord`` (free time, s); attrs ``shots``.
    height_nm, height_sigma_nm : float
        Layer height above the NV (e.g. from :func:`fit_layer_image`), nm.
    flip_probability : float, optional
        p0, the on-resonance flip probability; default ``line.peak``.
    line : FlipLine, optional
    axis : array_like (3,), optional
    coord : str

    Returns
    -------
    LayerFit
        ``method="decay"``; the height is passed through.
    """
    check_gates(ds)
    if flip_probability is None:
        if line is None:
            raise NvmriError("fit_layer_decay needs flip_probability or the dark-spin line")
        flip_probability = line.peak
    p0 = float(flip_probability)
    ok = np.asarray(valid_points(ds).values)
    taus = np.asarray(ds[coord].values, float)[ok]
    counts = np.stack([np.asarray(ds[g].values, float)[ok] for g in _GATES])
    shots = np.broadcast_to(np.asarray(ds.attrs.get("shots", 1.0), float), ok.shape)[ok]
    _, csig = contrast_with_sigma(*counts)
    spins_coh = np.ones_like(taus)
    for nu_k in spin_couplings_hz:
        spins_coh = spins_coh * (1.0 - p0 * physics.deer_weight(abs(float(nu_k)), taus))

    def density_at(h: float) -> tuple[float, float, float, float]:
        jt = layer_decay_integral(taus, h, axis)

        def model(th: NDArray) -> NDArray:
            return 1.0 - np.exp(-th[0] * p0 * jt) * spins_coh

        n0 = 1.0 / max(p0 * float(np.median(jt)), 1e-9)
        fit = fit_sweep(counts, shots, model, np.array([n0]), np.array([0.0]),
                        np.array([np.inf]), np.array([1e-4 * n0]), echo_per_point=True)
        n = float(fit.theta[0])
        # realisation variance by linear response of the weighted fit
        slope = p0 * jt * np.exp(-n * p0 * jt) * spins_coh      # dc/dn
        wts = np.where(np.isfinite(csig) & (csig > 0), 1.0 / np.square(csig), 0.0)
        a_tau = slope * wts / max(float(np.sum(slope**2 * wts)), 1e-300)
        nu, area = _decay_quadrature(h, axis, None)
        resp = a_tau * np.exp(-n * p0 * jt) * spins_coh * p0    # per tau
        g = physics.deer_weight(nu[None, :], taus[:, None]).T @ resp
        real_var = n * float(np.sum(g**2 * area))
        return n, float(fit.theta_sigma[0]), fit.chi2_reduced, real_var

    n, sn, chi2r, real_var = density_at(height_nm)
    var = sn**2 + real_var
    if height_sigma_nm > 0:
        n_hi = density_at(height_nm + height_sigma_nm)[0]
        n_lo = density_at(max(height_nm - height_sigma_nm, 0.5))[0]
        var += (0.5 * (n_hi - n_lo)) ** 2
    return LayerFit(height_nm=float(height_nm), height_sigma_nm=float(height_sigma_nm),
                    density_per_nm2=n, density_sigma_per_nm2=float(np.sqrt(var)),
                    chi2_reduced=chi2r, method="decay")
