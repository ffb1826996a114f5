"""Deconvolution of DEER rasters: the MRI imaging operators and Richardson-Lucy with them.

* :class:`ShiftOperator`, the imaging model of a DEER raster: a spin at offset
  r' from the NV contributes ``PSF(t - r')`` at tip position t, so a raster
  (tip grid) is a sum over object planes (offset grid, same lateral step) of 2-D
  convolutions with PSF slices.  :func:`richardson_lucy_operator` runs RL with it
  (object grid may be 3-D while the raster is a single plane).

* :class:`PointOperator`, the same model as a dense matrix for arbitrary tip
  positions (several rasters, irregular points) onto a fine voxel grid in a
  small box: ``y_p = sum_v x_v K(t_p - r_v)``.

Regularisation: Morozov's discrepancy principle.  Iterate until the
reblurred estimate fits the data to the noise level,
``mean(((y - A x) / sigma)^2) <= 1``, or ``max_iter``.  The check is free:
``A x`` is computed by every iteration anyway.  ``sigma`` is either given
(e.g. propagated from photon counts, scalar or per-point) or estimated by
:func:`estimate_noise` (MAD of first differences).

The generic n-D FFT Richardson-Lucy of an image by a PSF array (scikit-image
compatible), the alternative the ``deconvolve`` benchmark times these against:
:mod:`.deconvolve_fft`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, NDArray
from scipy.interpolate import CubicSpline

__all__ = [
    "estimate_noise", "RichardsonLucyResult", "ShiftOperator", "PointOperator",
    "ImagingOperator", "richardson_lucy_operator",
]

_EPS = 1e-12          # skimage's guard against division by zero
_WORKERS = -1         # all cores for scipy.fft


def estimate_noise(image: ArrayLike) -> float:
    """Robust white-noise standard deviation of an n-D map.

    MAD of the first differences along every axis of length > 1 (pooled),
    divided by sqrt(2) (a difference of two independent samples) and scaled
    by 1.4826 (MAD -> sigma for a normal distribution).  Smooth structure
    barely contributes to first differences; sparse sharp features are
    outliers the median ignores.

    Parameters
    ----------
    image : array_like, any shape
        Map values (NaNs ignored).

    Returns
    -------
    float
        sigma, in the image's unit.
    """
    a = np.asarray(image, float)
    diffs = [np.diff(a, axis=ax).ravel() for ax in range(a.ndim) if a.shape[ax] > 1]
    if not diffs:
        raise ValueError("need at least two samples along one axis to estimate noise")
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / np.sqrt(2.0))


@dataclass(frozen=True)
class RichardsonLucyResult:
    """Result of a Richardson-Lucy run with the discrepancy stopping rule.

    Attributes
    ----------
    image : ndarray
        Object estimate, shape of the input map.
    num_iter : int
        Iterations run.
    chi2 : float
        mean(((y - h * x) / sigma)^2) of the last estimate.
    converged : bool
        True if the discrepancy ``chi2 <= 1`` was reached before ``max_iter``.
    """

    image: NDArray
    num_iter: int
    chi2: float
    converged: bool


# --------------------------------------------------------------------------- #
# The MRI imaging operator: object (offset grid) -> raster (tip grid)
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class ShiftOperator:
    """Linear DEER imaging model ``y(t_i) = sum_s x(s) K(t_i - s)`` by FFT.

    The raster (tip positions) is ``x0 + i hx, y0 + j hy`` on planes
    ``z_img``; the object grid (offsets r' from the NV) is ``k hx, l hy`` for
    ``|k| <= kx, |l| <= ky`` on planes ``z_obj`` (any values).  Lateral steps
    are shared, so every raster-object difference is a lattice point and the
    sum over one object plane is a 2-D convolution with the kernel slice
    ``K(x0 + m hx, y0 + n hy, z_img - z_obj)``.  Build with :meth:`build`.

    Attributes
    ----------
    image_shape : (nx, ny, nz_img)
    object_shape : (2 kx + 1, 2 ky + 1, nz_obj)
    kernels_f : ndarray, complex, shape (nz_img, nz_obj, Lx, Ly // 2 + 1)
        rFFTs of the kernel slices (zero-padded to Lx, Ly).
    """

    image_shape: tuple[int, int, int]
    object_shape: tuple[int, int, int]
    fft_shape: tuple[int, int]
    kernels_f: NDArray

    @classmethod
    def build(cls, kernel: Callable[[NDArray], ArrayLike], x: ArrayLike, y: ArrayLike,
              z_img: ArrayLike, kx: int, ky: int, z_obj: ArrayLike,
              supersample: int = 3) -> ShiftOperator:
        """Sample the kernel and precompute its FFTs.

        Parameters
        ----------
        kernel : callable
            ``kernel(points) -> values``, points shape (..., 3) in nm (tip
            position minus offset, i.e. where the NV-frame PSF is wanted).
            NaN (outside the PSF map) is treated as 0.
        x, y : array_like
            Raster axes, uniform steps, nm.
        z_img : array_like
            Raster planes, nm.
        kx, ky : int
            Object half-extent in lateral steps.
        z_obj : array_like
            Object-plane offsets dz, nm.
        supersample : int
            Each kernel value is the mean over ``supersample^2`` sub-points of
            the lateral voxel (a spin anywhere in the voxel), so a thin
            resonant shell is not missed by point sampling.
        """
        xs, ys = np.asarray(x, float), np.asarray(y, float)
        zi, zo = np.atleast_1d(np.asarray(z_img, float)), np.atleast_1d(np.asarray(z_obj, float))
        hx = xs[1] - xs[0] if xs.size > 1 else 1.0
        hy = ys[1] - ys[0] if ys.size > 1 else 1.0
        nx, ny = xs.size, ys.size
        mx = np.arange(-kx, nx + kx) * hx + xs[0]         # kernel lattice, index q = m + kx
        my = np.arange(-ky, ny + ky) * hy + ys[0]
        lx = sfft.next_fast_len(nx + 2 * kx, real=False)
        ly = sfft.next_fast_len(ny + 2 * ky, real=True)
        sub = (np.arange(supersample) + 0.5) / supersample - 0.5
        kern_f = np.empty((zi.size, zo.size, lx, ly // 2 + 1), complex)
        gx, gy = np.meshgrid(mx, my, indexing="ij")
        for a, zt in enumerate(zi):
            for b, zs in enumerate(zo):
                acc = np.zeros_like(gx)
                for sx in sub:
                    for sy in sub:
                        pts = np.stack([gx - sx * hx, gy - sy * hy,
                                        np.full_like(gx, zt - zs)], axis=-1)
                        acc += np.nan_to_num(np.asarray(kernel(pts), float))
                acc /= supersample**2
                kern_f[a, b] = sfft.rfft2(acc, s=(lx, ly), workers=_WORKERS)
        return cls(image_shape=(nx, ny, zi.size), object_shape=(2 * kx + 1, 2 * ky + 1, zo.size),
                   fft_shape=(lx, ly), kernels_f=kern_f)

    def forward(self, obj: ArrayLike) -> NDArray:
        """Raster map from an object, shapes object_shape -> image_shape."""
        o = np.asarray(obj, float)
        nx, ny, _ = self.image_shape
        kx, ky = (self.object_shape[0] - 1) // 2, (self.object_shape[1] - 1) // 2
        of = sfft.rfft2(np.moveaxis(o, -1, 0), s=self.fft_shape, workers=_WORKERS)
        yf = np.einsum("abij,bij->aij", self.kernels_f, of)
        full = sfft.irfft2(yf, s=self.fft_shape, workers=_WORKERS)
        return np.moveaxis(full[:, 2 * kx:2 * kx + nx, 2 * ky:2 * ky + ny], 0, -1)

    def adjoint(self, img: ArrayLike) -> NDArray:
        """Adjoint (correlation), shapes image_shape -> object_shape."""
        y = np.asarray(img, float)
        nx, ny, nz = self.image_shape
        kx, ky = (self.object_shape[0] - 1) // 2, (self.object_shape[1] - 1) // 2
        pad = np.zeros((nz,) + self.fft_shape)
        pad[:, 2 * kx:2 * kx + nx, 2 * ky:2 * ky + ny] = np.moveaxis(y, -1, 0)
        yf = sfft.rfft2(pad, workers=_WORKERS)
        of = np.einsum("abij,aij->bij", np.conj(self.kernels_f), yf)
        full = sfft.irfft2(of, s=self.fft_shape, workers=_WORKERS)
        return np.moveaxis(full[:, :2 * kx + 1, :2 * ky + 1], 0, -1)


def _spline_matrix(fine: NDArray, step: float) -> tuple[NDArray, NDArray]:
    """Coarse nodes spanning ``fine`` (spacing <= ``step``, >= 4 of them) and the
    not-a-knot cubic-spline matrix (n_fine, n_coarse) that interpolates node values."""
    n = max(int(np.ceil((fine[-1] - fine[0]) / step - 1e-9)) + 1, 4)
    nodes = np.linspace(fine[0], fine[-1], n)
    return nodes, CubicSpline(nodes, np.eye(n))(fine)


@dataclass(frozen=True)
class PointOperator:
    """Dense DEER imaging model ``y_p = sum_v x_v K(t_p - r_v)`` for arbitrary tips.

    The object is a regular voxel grid (axes ``dx``, ``dy``, ``dz``: offsets r'
    from the NV, any spacing), the image the kept tip positions t_p in any
    order.  Build with :meth:`build`, join rasters with :meth:`stack`.

    Attributes
    ----------
    matrix : ndarray, float32, shape (P, V)
        K(t_p - r_v), V = nx ny nz (C order of the voxel axes).
    object_shape : (nx, ny, nz)
    rows : ndarray of int, shape (P,)
        Index of every kept row in the tips given to :meth:`build` (rows whose
        kernel is negligible over the whole box are dropped).
    """

    matrix: NDArray
    object_shape: tuple[int, int, int]
    rows: NDArray

    @property
    def image_shape(self) -> tuple[int]:
        """(P,): one value per kept tip."""
        return (self.matrix.shape[0],)

    @classmethod
    def build(cls, kernel: Callable[[NDArray], ArrayLike], tips: ArrayLike, dx: ArrayLike,
              dy: ArrayLike, dz: ArrayLike, *, smooth: Callable[[NDArray], ArrayLike] | None
              = None, coarse_step: float = 1.0, rel_cut: float = 1e-3,
              chunk: int = 2_000_000) -> PointOperator:
        """Sample K(t - r) at every tip and voxel centre.

        Parameters
        ----------
        kernel : callable
            Without ``smooth``: ``kernel(points) -> values``, points (..., 3) nm
            (tip minus voxel centre).  With ``smooth``: K = kernel(smooth(points)),
            ``kernel`` elementwise.  NaN (e.g. outside the PSF map) counts as 0.
        tips : array_like, (P0, 3)
            Tip positions, nm.
        dx, dy, dz : array_like
            Voxel-centre axes, nm (ascending).
        smooth : callable, optional
            A smooth field (e.g. Delta f_dark, Hz) evaluated only on a coarse
            lattice of the box (spacing <= ``coarse_step`` nm) per tip and
            cubic-spline interpolated to the voxels; exact to ~(step / L)^4 of
            the field (L its length scale, > 30 nm for a tip field), and about
            (coarse_step / voxel)^3 times cheaper than evaluating it at every voxel.
        coarse_step : float
            nm, only with ``smooth``.
        rel_cut : float
            Rows whose largest kernel value is below ``rel_cut`` times the
            overall largest are dropped (tips that do not image the box).
        chunk : int
            Kernel values computed at once (bounds the temporary memory).

        Returns
        -------
        PointOperator
            ``matrix`` (P, nx ny nz) float32 over the P kept tips (``rows``).
        """
        t = np.asarray(tips, float).reshape(-1, 3)
        axes = [np.atleast_1d(np.asarray(a, float)) for a in (dx, dy, dz)]
        shape = tuple(a.size for a in axes)
        if smooth is None:
            vox = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        else:
            nodes, mats = zip(*(_spline_matrix(a, coarse_step) for a in axes), strict=True)
            vox = np.stack(np.meshgrid(*nodes, indexing="ij"), -1)
        step = max(chunk // int(np.prod(shape)), 1)
        out = np.empty((t.shape[0], int(np.prod(shape))), np.float32)
        for i in range(0, t.shape[0], step):
            pts = t[i:i + step, None, None, None, :] - vox.reshape(1, *vox.shape[:-1], 3)
            if smooth is None:
                k = kernel(pts)
            else:
                f = np.einsum("pijk,ai,bj,ck->pabc", np.asarray(smooth(pts), float), *mats,
                              optimize=True)
                k = kernel(f)
            out[i:i + step] = np.nan_to_num(np.asarray(k, float)).reshape(pts.shape[0], -1)
        peak = out.max(axis=1)
        rows = np.flatnonzero(peak > rel_cut * max(float(peak.max(initial=0.0)), 1e-300))
        return cls(matrix=out if rows.size == out.shape[0] else out[rows],
                   object_shape=shape, rows=rows)

    @classmethod
    def stack(cls, ops: Sequence[PointOperator]) -> PointOperator:
        """One operator over the rows of several (same object grid); ``rows`` per part kept
        as given, so use each part's ``rows`` to pick its data."""
        if len({op.object_shape for op in ops}) != 1:
            raise ValueError("stacked point operators need one object grid")
        return cls(matrix=np.concatenate([op.matrix for op in ops]),
                   object_shape=ops[0].object_shape,
                   rows=np.concatenate([op.rows for op in ops]))

    def forward(self, obj: ArrayLike) -> NDArray:
        """Image (P,) from an object of ``object_shape``."""
        x = np.asarray(obj, np.float32).reshape(-1)
        return (self.matrix @ x).astype(float)

    def adjoint(self, img: ArrayLike) -> NDArray:
        """Adjoint, image (P,) -> ``object_shape``."""
        y = np.asarray(img, np.float32).reshape(-1)
        return (y @ self.matrix).astype(float).reshape(self.object_shape)


class ImagingOperator(Protocol):
    """What :func:`richardson_lucy_operator` needs of a linear imaging model."""

    @property
    def image_shape(self) -> tuple[int, ...]: ...

    @property
    def object_shape(self) -> tuple[int, ...]: ...

    def forward(self, obj: ArrayLike) -> NDArray: ...

    def adjoint(self, img: ArrayLike) -> NDArray: ...


def richardson_lucy_operator(image: ArrayLike, op: ImagingOperator,
                             sigma: float | ArrayLike | None = None,
                             max_iter: int = 200) -> RichardsonLucyResult:
    """Richardson-Lucy for ``y = A x`` (:class:`ShiftOperator`, :class:`PointOperator`),
    discrepancy stop.

    ``x <- x * A^T(y / (A x + eps)) / A^T(1)``, x >= 0, started flat at the
    least-squares level ``sum(y) / sum(A 1)``.  Negative data (noise on a
    contrast map) are clipped to 0 first.  Stops when
    ``mean(((y - A x) / sigma)^2) <= 1`` or after ``max_iter``.

    Parameters
    ----------
    image : array_like, op.image_shape
        Raster map (DEER contrast).
    op : ImagingOperator
        Any object with ``image_shape``, ``object_shape``, ``forward``, ``adjoint``.
    sigma : float or array_like, optional
        Noise (scalar or per point); default :func:`estimate_noise` of the image.

    Returns
    -------
    RichardsonLucyResult
        ``image`` is on ``op.object_shape``.
    """
    y_raw = np.asarray(image, float)
    if sigma is None:
        sigma = estimate_noise(y_raw)
    inv_s2 = 1.0 / np.square(np.asarray(sigma, float))
    y = np.clip(np.nan_to_num(y_raw), 0.0, None)
    norm = op.adjoint(np.ones(op.image_shape))
    norm = np.where(norm > 1e-12 * norm.max(), norm, np.inf)
    a1 = op.forward(np.ones(op.object_shape))
    x = np.full(op.object_shape, max(y.sum(), 1e-12) / max(a1.sum(), 1e-300))
    chi2, done, converged = float("nan"), 0, False
    for _ in range(max_iter):
        ax = op.forward(x)
        chi2 = float(np.nanmean((y_raw - ax) ** 2 * inv_s2))
        if chi2 <= 1.0:
            converged = True
            break
        x = x * op.adjoint(y / (np.clip(ax, 0.0, None) + _EPS)) / norm
        done += 1
    return RichardsonLucyResult(image=x, num_iter=done, chi2=chi2, converged=converged)
