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
Integration domain: the layer plane within ``rho_max_nm`` of the NV (default
45 nm), restricted to where the PSF map covers t - (rho, h); elsewhere the
PSF counts as 0 (spins there are far from the imaged resonance when the
PSF map is sized as docs/reconstruction.md says).

The fits of height and density to counts: :mod:`.layer_fits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant
from nvmri_bluesky.reconstruct.psf import DarkSpinPSF

__all__ = [
    "layer_weights", "layer_integral", "layer_contrast", "layer_decay_integral",
    "layer_decay", "layer_coupling_rate",
]


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


def _psf_planes(psf: DarkSpinPSF, ux: NDArray, uy: NDArray, zs: NDArray
                ) -> tuple[NDArray, ...]:
    """The PSF on the lattice ``ux`` x ``uy`` at each tip height ``zs`` (0 outside the map).

    A PSF on one measured map takes its Delta f_dark on the lattice as the spline's
    tensor product (:meth:`DetuningInterpolant.at_offsets`, from a tip at the origin:
    equal to the pointwise spline to rounding, a fraction of its CPU); any other
    Delta f_dark (a map plus its interpolation error) point by point.
    """
    if isinstance(psf.detuning, DetuningInterpolant):
        df = psf.detuning.at_offsets(np.zeros((1, 3)), (-ux, -uy, -zs))
        df = df.reshape(ux.size, uy.size, zs.size)
        return tuple(np.nan_to_num(psf.of_detuning(df[:, :, k])) for k in range(zs.size))
    gux, guy = np.meshgrid(ux, uy, indexing="ij")
    return tuple(np.nan_to_num(psf(np.stack([gux, guy, np.full_like(gux, zt)], -1)))
                 for zt in zs)


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
    planes = _psf_planes(psf, ux, uy, np.atleast_1d(np.asarray(z, float)) - height_nm)
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


