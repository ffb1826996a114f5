"""Spin densities from DEER rasters by Richardson-Lucy: the localisation's fit starts
and the fine density for Fig. 4.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.counts import deer_contrast_dataset, valid_points
from nvmri_bluesky.reconstruct.deconvolve import (
    PointOperator,
    RichardsonLucyResult,
    ShiftOperator,
    richardson_lucy_operator,
)
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant
from nvmri_bluesky.reconstruct.lines import FlipLine
from nvmri_bluesky.reconstruct.psf import DarkSpinPSF
from nvmri_bluesky.reconstruct.spinmodel import PRIOR_BOX, _contrast_and_grad, _prepare, _Raster

__all__ = ["deconvolve_deer", "shift_operator", "fine_density", "MATCHED_STARTS",
           "MATCHED_FILTER_BUDGET"]


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
    detuning = r0.psf.detuning
    # Delta f_dark at every tip - offset: by the spline's tensor product when it is one map
    shifted = (detuning.at_offsets(tips, axes) if isinstance(detuning, DetuningInterpolant)
               else None)
    for i in range(0, len(grid), chunk):
        g = grid[i:i + chunk]
        if shifted is None:
            pts = (tips[None, :, :] - g[:, None, :]).reshape(-1, 3)
            df = detuning(pts).reshape(len(g), -1)
        else:
            df = shifted[i:i + chunk]
        psf = np.nan_to_num(r0.psf.line.probability(off - df))
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
    dims = [a for a in ("x", "y", "z") if a in ds["signal"].dims] or list(ds["signal"].dims)
    d = ds.transpose(*dims, ...)                 # a grid, or a list of points (as _prepare)
    con = deer_contrast_dataset(d)
    ok = valid_points(d).transpose(*dims).values
    c_data = con["contrast"].transpose(*dims).values[ok]
    s_data = con["contrast_sigma"].transpose(*dims).values[ok]
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
