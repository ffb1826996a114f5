"""Dark-spin layers: height above the NV and areal density.

Model (honest about what is random).  A layer is a 2-D Poisson process of
spins of areal density n in the plane a height h above the NV (offsets
r' = (rho_x, rho_y, h)).  For any function f, a Poisson process obeys
E[prod_j (1 - f(r_j'))] = exp(-n integral f d^2 rho), so the *expected* DEER
contrast of the layer is

* imaging (tip at t, RF offset on the measured PSF):
  c(t) = 1 - exp(-n I(t; h)),
  I(t; h) = integral d^2 rho  w(rho, h) PSF(t - (rho, h)),
* tip-free DEER evolution (RF on the line, flip probability p0):
  c(tau) = 1 - exp(-n p0 J(tau; h)),
  J(tau; h) = integral d^2 rho  [1 - cos(pi nu(rho, h) tau)],

with w = ``physics.deer_weight(physics.dipolar_coupling((rho, h), axis), tau)``.
A measured map is *one realisation*: near the NV only tens of spins matter,
so the data scatter about the expectation by more than photon noise.  The
fits below therefore report sigmas inflated by sqrt(Pearson chi^2 / dof),
and the decay fit adds the height's uncertainty to the density's.

Recommended use (the paper's): the height from the image (the resonant dome
is shifted by h; :func:`fit_layer_image`), the density from the tip-free
decay at that height (:func:`fit_layer_decay`, which samples ~ pi (1.5 h)^2 n
spins and so fluctuates least).  The image's own density is a cross-check.

Integration domain: the layer plane within ``rho_max_nm`` of the NV (default
45 nm), restricted to where the PSF map covers t - (rho, h); elsewhere the
PSF counts as 0 (spins there are far from the imaged resonance when the
PSF map is sized as docs/reconstruction.md says).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct._poisson import fit_sweep, gate_means, initial_nuisance, poisson_ml
from nvmri_bluesky.reconstruct.counts import check_gates, contrast_with_sigma, valid_points
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant
from nvmri_bluesky.reconstruct.lines import FlipLine
from nvmri_bluesky.reconstruct.psf import DarkSpinPSF

__all__ = [
    "LayerFit", "layer_weights", "layer_integral", "layer_contrast", "layer_decay_integral",
    "layer_decay", "fit_layer_image", "fit_layer_decay", "layer_coupling_rate",
]

_GATES = ("signal", "echo", "bright", "dark")


def _axis(axis: ArrayLike | None) -> NDArray:
    return physics.Instrument().nv_axis if axis is None else np.asarray(axis, float)


def layer_weights(rho_x: ArrayLike, rho_y: ArrayLike, height_nm: float, tau_s: float,
                  axis: ArrayLike | None = None) -> NDArray:
    """DEER weight w of a layer spin at (rho_x, rho_y, height) from the NV.

    Parameters
    ----------
    rho_x, rho_y : array_like, broadcastable
        Lateral offsets, nm.
    height_nm : float
        Layer height above the NV, nm.
    tau_s : float
    axis : array_like (3,), optional
        B0 direction (default physics.Instrument's NV axis).

    Returns
    -------
    ndarray
        ``physics.deer_weight(physics.dipolar_coupling(r', axis), tau)``.
    """
    rx, ry = np.broadcast_arrays(np.asarray(rho_x, float), np.asarray(rho_y, float))
    off = np.stack([rx, ry, np.full_like(rx, float(height_nm))], -1)
    return physics.deer_weight(physics.dipolar_coupling(off, _axis(axis)), tau_s)


def _lattice(v: NDArray) -> tuple[float, float]:
    u = np.unique(np.asarray(v, float))
    if u.size < 2:
        raise NvmriError("layer raster needs at least 2 points along x and y")
    d = np.diff(u)
    if np.ptp(d) > 1e-6 * d[0]:
        raise NvmriError("layer raster needs uniform lateral steps")
    return float(u[0]), float(d[0])


@dataclass(frozen=True)
class _LayerGeometry:
    """Fine lattices of the layer integral for one raster and one height."""

    w: NDArray                 # (2kx+1, 2ky+1) weights * cell area, nm^2
    planes: tuple[NDArray, ...]  # PSF on the u = t - rho lattice per raster plane
    kx: int
    ky: int
    mx: int
    my: int
    nx: int
    ny: int
    fshape: tuple[int, int]


def _layer_geometry(psf: DarkSpinPSF, x: ArrayLike, y: ArrayLike, z: ArrayLike,
                    height_nm: float, tau_s: float, axis: ArrayLike | None,
                    rho_max_nm: float, fine_nm: float) -> _LayerGeometry:
    x0, hx = _lattice(x)
    y0, hy = _lattice(y)
    nx, ny = np.size(x), np.size(y)
    mx, my = max(int(np.ceil(hx / fine_nm)), 1), max(int(np.ceil(hy / fine_nm)), 1)
    dx, dy = hx / mx, hy / my
    kx, ky = int(np.ceil(rho_max_nm / dx)), int(np.ceil(rho_max_nm / dy))
    rx = np.arange(-kx, kx + 1) * dx
    ry = np.arange(-ky, ky + 1) * dy
    grx, gry = np.meshgrid(rx, ry, indexing="ij")
    w = layer_weights(grx, gry, height_nm, tau_s, axis)
    w = np.where(grx**2 + gry**2 <= rho_max_nm**2, w, 0.0) * dx * dy
    ux = x0 + np.arange(-kx, (nx - 1) * mx + kx + 1) * dx
    uy = y0 + np.arange(-ky, (ny - 1) * my + ky + 1) * dy
    gux, guy = np.meshgrid(ux, uy, indexing="ij")
    planes = tuple(np.nan_to_num(psf(np.stack([gux, guy, np.full_like(gux, zt - height_nm)],
                                              -1)))
                   for zt in np.atleast_1d(np.asarray(z, float)))
    shape = (ux.size + rx.size - 1, uy.size + ry.size - 1)
    fshape = (sfft.next_fast_len(shape[0]), sfft.next_fast_len(shape[1], real=True))
    return _LayerGeometry(w, planes, kx, ky, mx, my, nx, ny, fshape)


def _layer_forward(g: _LayerGeometry) -> NDArray:
    """I on the raster (nx, ny, nz): full[2k + i m] of w (*) P per plane."""
    wf = sfft.rfft2(g.w, s=g.fshape, workers=-1)
    out = np.empty((g.nx, g.ny, len(g.planes)))
    for k, p in enumerate(g.planes):
        full = sfft.irfft2(sfft.rfft2(p, s=g.fshape, workers=-1) * wf, s=g.fshape, workers=-1)
        out[:, :, k] = full[2 * g.kx:2 * g.kx + (g.nx - 1) * g.mx + 1:g.mx,
                            2 * g.ky:2 * g.ky + (g.ny - 1) * g.my + 1:g.my]
    return out


def _layer_adjoint(g: _LayerGeometry, b: NDArray) -> NDArray:
    """sum_t b_t PSF(t - rho) on the rho lattice (2kx+1, 2ky+1), b on the raster (nx, ny, nz)."""
    out = np.zeros_like(g.w)
    lx, ly = (g.nx - 1) * g.mx + 1, (g.ny - 1) * g.my + 1
    for k, p in enumerate(g.planes):
        up = np.zeros((lx, ly))
        up[::g.mx, ::g.my] = b[:, :, k]
        full = sfft.irfft2(sfft.rfft2(up, s=g.fshape, workers=-1)
                           * sfft.rfft2(p[::-1, ::-1], s=g.fshape, workers=-1),
                           s=g.fshape, workers=-1)
        out += full[lx - 1:lx - 1 + 2 * g.kx + 1, ly - 1:ly - 1 + 2 * g.ky + 1]
    return out


def layer_integral(psf: DarkSpinPSF, x: ArrayLike, y: ArrayLike, z: ArrayLike,
                   height_nm: float, tau_s: float, axis: ArrayLike | None = None,
                   rho_max_nm: float = 45.0, fine_nm: float = 0.5) -> NDArray:
    """I(t; h) = integral d^2 rho w(rho, h) PSF(t - (rho, h)) on a raster, nm^2.

    Riemann sum on a lattice of step ~``fine_nm`` that divides the raster
    step, one 2-D FFT convolution per raster plane.

    Parameters
    ----------
    psf : DarkSpinPSF
        Measured PSF for the raster's RF frequency.
    x, y : array_like
        Raster axes (uniform steps), nm.
    z : array_like
        Raster planes (apex heights), nm.
    height_nm : float
        Layer height above the NV, nm.
    tau_s : float
    axis : array_like (3,), optional
    rho_max_nm : float
        Radius of the layer disk integrated, nm.
    fine_nm : float
        Target integration step, nm.

    Returns
    -------
    ndarray, (nx, ny, nz)
        The integral, nm^2 (n times it is the expected -log(1 - c)).
    """
    return _layer_forward(_layer_geometry(psf, x, y, z, height_nm, tau_s, axis, rho_max_nm,
                                          fine_nm))


def layer_contrast(psf: DarkSpinPSF, x: ArrayLike, y: ArrayLike, z: ArrayLike,
                   height_nm: float, density_per_nm2: float, tau_s: float,
                   axis: ArrayLike | None = None, rho_max_nm: float = 45.0) -> NDArray:
    """Expected DEER contrast of a layer, 1 - exp(-n I(t; h)), shape (nx, ny, nz)."""
    return 1.0 - np.exp(-density_per_nm2 * layer_integral(psf, x, y, z, height_nm, tau_s,
                                                          axis, rho_max_nm))


def _decay_quadrature(height_nm: float, axis: ArrayLike | None, rho_max_nm: float | None,
                      n_radial: int = 600, n_angle: int = 120) -> tuple[NDArray, NDArray]:
    """Couplings nu and areas of a polar quadrature of the layer plane."""
    r_max = 12.0 * height_nm if rho_max_nm is None else rho_max_nm
    s = (np.arange(n_radial) + 0.5) / n_radial          # rho = r_max s^2: dense near the NV
    rho = r_max * s**2
    drho = r_max * 2.0 * s / n_radial
    phi = (np.arange(n_angle) + 0.5) * 2.0 * np.pi / n_angle
    gr, gp = np.meshgrid(rho, phi, indexing="ij")
    nu = physics.dipolar_coupling(np.stack([gr * np.cos(gp), gr * np.sin(gp),
                                            np.full_like(gr, float(height_nm))], -1),
                                  _axis(axis))
    area = gr * drho[:, None] * (2.0 * np.pi / n_angle)
    return nu.ravel(), area.ravel()


def layer_decay_integral(tau_s: ArrayLike, height_nm: float, axis: ArrayLike | None = None,
                         rho_max_nm: float | None = None) -> NDArray:
    """J(tau; h) = integral d^2 rho [1 - cos(pi nu tau)] over the layer plane, nm^2.

    Polar quadrature out to ``rho_max_nm`` (default 12 h, where the
    integrand has fallen as (h / rho)^6).

    Returns
    -------
    ndarray, shape of ``tau_s``.
    """
    taus = np.asarray(tau_s, float)
    j = _decay_integral(taus.tobytes(), float(height_nm), tuple(_axis(axis)), rho_max_nm)
    return j.reshape(taus.shape)


@lru_cache(maxsize=256)
def _decay_integral(taus: bytes, height_nm: float, axis: tuple[float, ...],
                    rho_max_nm: float | None) -> NDArray:
    """:func:`layer_decay_integral` on flat taus (their bytes), remembered: the model choice
    and the layer fits ask for the same (taus, height) many times.  Read-only."""
    nu, area = _decay_quadrature(height_nm, np.array(axis), rho_max_nm)
    w = physics.deer_weight(nu[None, :], np.frombuffer(taus).reshape(-1, 1))
    out = w @ area
    out.flags.writeable = False
    return out


def layer_decay(tau_s: ArrayLike, height_nm: float, density_per_nm2: float,
                flip_probability: float, axis: ArrayLike | None = None) -> NDArray:
    """Expected tip-free DEER contrast of a layer, 1 - exp(-n p0 J(tau; h))."""
    return 1.0 - np.exp(-density_per_nm2 * flip_probability
                        * layer_decay_integral(tau_s, height_nm, axis))


def layer_coupling_rate(height_nm: float, density_per_nm2: float,
                        axis: ArrayLike | None = None) -> float:
    """NV-layer coupling rate: the rms coupling of the layer's spins, Hz.

    physics.rms_coupling over the layer plane h above the NV with density n,
    sqrt(n integral nu(rho)^2 d^2 rho); the layer's tip-free DEER decay starts
    as 1 - exp(-p0 (pi tau nu_rms)^2 / 2).
    """
    nu, area = _decay_quadrature(height_nm, axis, None)
    return physics.rms_coupling(nu, density_per_nm2 * area)


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
    arrays = [_raster_arrays(d) for d in sets]
    psfs = [DarkSpinPSF(detuning, line, float(d.attrs["rf_frequency_hz"])) for d in sets]
    taus = [float(d.attrs["tau_s"]) for d in sets]
    r_max = float(rho_max_nm)
    obs = np.concatenate([a[3][:, a[4]].ravel() for a in arrays])
    n_sets = len(sets)
    cache: dict[float, list[_LayerGeometry]] = {}

    def geoms(h: float) -> list[_LayerGeometry]:
        key = round(float(h), 6)
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = [_layer_geometry(p, a[0], a[1], a[2], h, t, axis, r_max, fine_nm)
                          for p, a, t in zip(psfs, arrays, taus, strict=True)]
        return cache[key]

    def integrals(h: float) -> list[NDArray]:
        return [_layer_forward(g)[a[4]] for g, a in zip(geoms(h), arrays, strict=True)]

    def fun_for(ints: list[NDArray], dints: list[NDArray] | None):
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

    nuis0 = []
    for a in arrays:
        a0, copt0, e0 = initial_nuisance(a[3][:, a[4]], a[5][a[4]])
        nuis0 += [a0, copt0, float(np.median(e0))]
    lo = np.r_[0.0, -np.inf, np.tile([1e-12, 0.0, 0.0], n_sets)]
    hi = np.r_[np.inf, np.inf, np.tile([np.inf, 1.0, 1.0], n_sets)]
    fix_h = np.r_[np.inf, 1e-9, np.full(3 * n_sets, np.inf)]   # h is profiled, not fitted
    state = {"theta": np.r_[0.3, 0.0, nuis0]}
    scanned: list[tuple[float, float]] = []

    def profile(h: float) -> float:
        fit = poisson_ml(fun_for(integrals(h), None), obs, state["theta"], lo, hi,
                         prior_sigma=fix_h, prior_mean=np.zeros(lo.size))
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
    eps = 0.05
    ip, im = integrals(h_best + eps), integrals(h_best - eps)
    dints = [(p_ - m_) / (2 * eps) for p_, m_ in zip(ip, im, strict=True)]
    ints = integrals(h_best)
    fit = poisson_ml(fun_for(ints, None), obs, state["theta"], lo, hi, prior_sigma=fix_h,
                     prior_mean=np.zeros(lo.size))
    # evidence: the same gates without the layer (n = 0, nuisances refitted)
    no_layer = poisson_ml(fun_for(ints, None), obs, np.r_[0.0, fit.theta[1:]], lo,
                          np.r_[0.0, hi[1:]], prior_sigma=fix_h, prior_mean=np.zeros(lo.size))
    theta = fit.theta
    mu, jac = fun_for(ints, dints)(theta, True)
    mu = np.maximum(mu, 1e-12)
    fisher = jac.T @ (jac / mu[:, None])
    chi2r = float(np.sum((obs - mu) ** 2 / mu) / max(obs.size - lo.size, 1))
    finv = np.linalg.pinv(fisher)
    cov = finv * max(chi2r, 1.0)
    # realisation (finite number of spins) part, linear response of (n, h)
    resp = finv[:2] @ (jac / mu[:, None]).T                   # (2, n_obs)
    start = 0
    gsum: list[NDArray] = []
    for i, (g, a) in enumerate(zip(geoms(h_best), arrays, strict=True)):
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
    if gsum:
        g0 = geoms(h_best)[0]
        cell = (_lattice(arrays[0][0])[1] / g0.mx) * (_lattice(arrays[0][1])[1] / g0.my)
        real = theta[0] * np.array([[np.sum(gsum[k] * gsum[m_]) / cell for m_ in range(2)]
                                    for k in range(2)])
        cov[:2, :2] += real
    # the PSF map's spline interpolation error as a systematic (as localize does): the
    # optimum's first-order shift if Delta f_dark were off by its estimate, the quartic
    # minus the cubic spline; the zoom raster's height hangs on the dome top, where the
    # map's 12 x 8 nm spline errs most
    alt = [DarkSpinPSF(_SplineErrorShifted(detuning), line, p.rf_frequency_hz) for p in psfs]
    ints_alt = [_layer_forward(_layer_geometry(p, a[0], a[1], a[2], h_best, t, axis, r_max,
                                               fine_nm))[a[4]]
                for p, a, t in zip(alt, arrays, taus, strict=True)]
    mu_alt = np.maximum(fun_for(ints_alt, None)(theta, False)[0], 1e-12)
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
