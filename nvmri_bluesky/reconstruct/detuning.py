"""The dark-frequency map: Delta f_dark(t) from a two-transition lock map, its noise,
and its cubic-spline interpolant (piece 1 of the PSF, see :mod:`.psf`).

A ``psf_map`` run locks both NV transitions at every tip position t.
:func:`physics.dark_spin_frequency_from_transitions` turns (f+, f-) into
gamma_e |B| exactly (B0 = 0.12 T sits just above the ground-state level
anticrossing, so the ms=0->+1 shift alone would be off by tens of MHz
wherever the tip field has a component across the NV axis).  The map is
referenced to the retracted-tip pair ``f_nv0_hz``, ``f_minus0_hz``:
Delta f_dark(t) = gamma|B|(t) - gamma|B|(far), so a miscalibrated zero-field
splitting D cancels to first order (:func:`dark_detuning_map`; its photon
noise :func:`dark_detuning_sigma`).

:class:`DetuningInterpolant` evaluates the map anywhere inside its box by a
cubic tensor B-spline (``scipy.ndimage`` spline filter + ``map_coordinates``),
with spline gradients.  Outside the box it returns NaN (never extrapolates).
Gaps (NaN locks) inside the map are filled from the nearest valid point
before the spline is built, if they are at most 5 % of the map.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError

__all__ = ["dark_detuning_map", "dark_detuning_sigma", "DetuningInterpolant"]

AXES = ("x", "y", "z")





def dark_detuning_map(psf_map: xr.Dataset, d_hz: float = physics.D_ZFS,
                      exact: bool = True) -> xr.DataArray:
    """Dark-spin detuning Delta f_dark(x, y, z) from a two-transition lock map.

    Parameters
    ----------
    psf_map : xarray.Dataset
        Coords ``x``, ``y``, ``z`` (nm); ``lock_frequency`` (f+, Hz) and
        ``lock_f_minus`` (signed f-, Hz) per point; attrs ``f_nv0_hz`` and
        ``f_minus0_hz`` (the retracted-tip pair).
    d_hz : float
        Zero-field splitting used by the inversion, Hz.
    exact : bool
        True (default) requires ``lock_f_minus``.  False, or a map without it,
        falls back to Delta f_dark ~ Delta f+ (exact only for tip fields along
        the NV axis; wrong by up to ~100 MHz close to the tip) with a warning.

    Returns
    -------
    xarray.DataArray
        Delta f_dark in Hz on the map's grid, name ``dark_detuning``.
    """
    if "lock_frequency" not in psf_map:
        raise NvmriError("PSF map lacks 'lock_frequency' (the locked ms=0->+1 frequency)")
    fp = psf_map["lock_frequency"]
    fp0 = _attr(psf_map, "f_nv0_hz")
    if exact and "lock_f_minus" in psf_map:
        fm0 = _attr(psf_map, "f_minus0_hz")
        fd = physics.dark_spin_frequency_from_transitions(fp.values, psf_map["lock_f_minus"].values,
                                                          d_hz)
        fd0 = float(physics.dark_spin_frequency_from_transitions(fp0, fm0, d_hz))
        values = fd - fd0
    else:
        warnings.warn("PSF map without the ms=0->-1 transition: using Delta f_dark = "
                      "Delta f_nv, which misplaces spins where the tip field crosses the NV "
                      "axis", stacklevel=2)
        values = fp.values - fp0
    out = xr.DataArray(values, dims=fp.dims, coords=fp.coords, name="dark_detuning")
    out.attrs["units"] = "Hz"
    return out



def _pair_offset_sigma(u: NDArray, ref: NDArray, contrast: float) -> NDArray:
    """Photon-noise sigma (FWHM units) of the lock pair's offset estimate at offset ``u``.

    The pair gates at f_mw -/+ FWHM/2 count ref (1 - C L(-/+1/2 - u)) on average
    (``ref`` the far-off reference gate's counts, C the CW contrast); the
    estimate :func:`physics.odmr_pair_offset` of the three Poisson counts is
    propagated linearly (central differences of 1e-3 of each count's sigma).
    Shapes broadcast; NaN where the estimate is undefined.
    """
    u = np.asarray(u, float)
    ref = np.maximum(np.asarray(ref, float), 1.0)
    counts = [ref * (1.0 - contrast * physics.lorentzian(-0.5 - u, 1.0)),
              ref * (1.0 - contrast * physics.lorentzian(0.5 - u, 1.0)), ref]

    def estimate(c: list[NDArray]) -> NDArray:
        return physics.odmr_pair_offset(1.0 - c[0] / c[2], 1.0 - c[1] / c[2])[0]

    var = np.zeros(np.broadcast(u, ref).shape)
    for k in range(3):
        h = 1e-3 * np.sqrt(counts[k])
        up, dn = list(counts), list(counts)
        up[k], dn[k] = counts[k] + h, counts[k] - h
        var = var + ((estimate(up) - estimate(dn)) / (2.0 * h)) ** 2 * counts[k]
    return np.sqrt(var)



def dark_detuning_sigma(psf_map: xr.DataArray | xr.Dataset, d_hz: float = physics.D_ZFS,
                        fwhm_hz: float | None = None) -> xr.DataArray:
    """One-sigma photon noise of every node of :func:`dark_detuning_map`, Hz.

    Each node's f+ and f- is one frequency-lock estimate.  Their sigmas are
    taken from data variables ``lock_frequency_sigma`` and
    ``lock_f_minus_sigma`` (Hz) when the map has them; otherwise from the
    lock's own record (:mod:`nvmri_bluesky.plans.lock`): the pair estimate's
    photon noise (:func:`_pair_offset_sigma`) at the offset it measured,
    ``lock_error`` / FWHM for f+, and for f- the offset the recorded lock gates
    ``lock_0``, ``lock_1``, ``lock_2`` give (the map's event holds the counts of
    the last acquisition at the point, the ms=0->-1 lock's); the reference
    counts are ``lock_2`` and the CW contrast is the map's median pair contrast.
    The two sigmas are propagated through
    :func:`physics.dark_spin_frequency_from_transitions` (central differences).
    The retracted-tip reference (common to all nodes) is not included: a
    common offset of the map is the line shift the localisation fits.

    Validated on the simulator's paper-fig4 map against the exact physics:
    errors / sigma have a MAD-sd of 1.0 (f+) and 1.07 (f-), with a few
    5-6 sigma outliers of locks far (|u| ~ 0.45 FWHM) off the line.

    Parameters
    ----------
    psf_map : xarray.Dataset
        As :func:`dark_detuning_map`, plus the sigmas or the lock record.
    d_hz : float
        Zero-field splitting of the inversion, Hz.
    fwhm_hz : float, optional
        CW line width of the lock, Hz (default 1 / ``tau_cw_s`` attr, else the
        lock's default probe width).

    Returns
    -------
    xarray.DataArray
        sigma of Delta f_dark on the map's grid, Hz, name ``dark_detuning_sigma``.
    """
    fp = np.asarray(psf_map["lock_frequency"].values, float)
    fm = np.asarray(psf_map["lock_f_minus"].values, float)
    if "lock_frequency_sigma" in psf_map and "lock_f_minus_sigma" in psf_map:
        sp = np.asarray(psf_map["lock_frequency_sigma"].values, float)
        sm = np.asarray(psf_map["lock_f_minus_sigma"].values, float)
    elif all(k in psf_map for k in ("lock_error", "lock_0", "lock_1", "lock_2")):
        if fwhm_hz is None:
            fwhm_hz = 1.0 / float(psf_map.attrs.get("tau_cw_s", physics.TAU_CW_S))
        ref = np.asarray(psf_map["lock_2"].values, float)
        with np.errstate(invalid="ignore", divide="ignore"):
            u_minus, contrast = physics.odmr_pair_offset(
                1.0 - psf_map["lock_0"].values / ref, 1.0 - psf_map["lock_1"].values / ref)
        c = float(np.nanmedian(np.where(np.isfinite(u_minus), contrast, np.nan)))
        u_plus = np.asarray(psf_map["lock_error"].values, float) / fwhm_hz
        sp = fwhm_hz * _pair_offset_sigma(u_plus, ref, c)
        sm = fwhm_hz * _pair_offset_sigma(np.nan_to_num(u_minus), ref, c)
    else:
        raise NvmriError("the PSF map carries neither lock sigmas nor the lock record "
                         "(lock_error, lock_0..2) to derive them")
    h = 1e3
    dfp = (physics.dark_spin_frequency_from_transitions(fp + h, fm, d_hz)
           - physics.dark_spin_frequency_from_transitions(fp - h, fm, d_hz)) / (2 * h)
    dfm = (physics.dark_spin_frequency_from_transitions(fp, fm + h, d_hz)
           - physics.dark_spin_frequency_from_transitions(fp, fm - h, d_hz)) / (2 * h)
    da = psf_map["lock_frequency"]
    out = xr.DataArray(np.hypot(dfp * sp, dfm * sm), dims=da.dims, coords=da.coords,
                       name="dark_detuning_sigma")
    out.attrs["units"] = "Hz"
    return out



def _attr(ds: xr.Dataset, key: str) -> float:
    if key not in ds.attrs:
        raise NvmriError(f"dataset attrs lack {key!r}")
    return float(ds.attrs[key])



def _fill_nans(values: NDArray, max_fraction: float = 0.05) -> NDArray:
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    if bad.mean() > max_fraction:
        raise NvmriError(f"PSF map has {bad.mean():.0%} invalid points (lock failures); "
                         f"at most {max_fraction:.0%} can be filled")
    idx = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
    return values[tuple(idx)]



def _complete_planes(da: xr.DataArray, max_missing: float = 0.05) -> NDArray:
    """Indices of the map's z planes that were measured: a map that stopped descending
    (see :func:`nvmri_bluesky.plans.rasters.psf_map`) leaves its lowest planes empty or
    cut short; planes with more than ``max_missing`` of their points missing are dropped."""
    if da.sizes["z"] < 2:
        return np.arange(da.sizes["z"])
    missing = (~np.isfinite(da)).mean(dim=("x", "y"))
    return np.flatnonzero(missing.values <= max_missing)



_PAD = 4     # cells of cubic extrapolation around the map before spline filtering


def _cubic_weights(x: NDArray, n: int) -> NDArray:
    """Cubic B-spline weights of coefficients 0..n-1 at (padded-index) positions ``x``:
    shape ``x.shape + (n,)``, four non-zero per position (as ``map_coordinates``, order
    3; indices outside 0..n-1 clipped, which no position inside the map reaches)."""
    base = np.floor(x)
    t = x - base
    u = 1.0 - t
    taps = (u * u * u / 6.0, 2.0 / 3.0 - t * t * (1.0 - t / 2.0),
            2.0 / 3.0 - u * u * (1.0 - u / 2.0), t * t * t / 6.0)
    out = np.zeros(x.shape + (n,))
    first = base.astype(int) - 1
    rows = np.indices(x.shape)
    for k, w in enumerate(taps):
        j = np.clip(first + k, 0, n - 1)
        np.add.at(out, (*rows, j), w)
    return out



def _extrapolate_pad(values: NDArray, pad: int) -> NDArray:
    """Pad every axis by ``pad`` cells continuing the cubic through the 4 edge points
    (the parabola through 3 along an axis of 3 points)."""
    out = values
    for ax in range(values.ndim):
        a = np.moveaxis(out, ax, 0)
        m = min(4, a.shape[0])
        vander = np.vander(np.arange(float(m)), m)           # rows: k^(m-1) ... k, 1
        lo_coef = np.linalg.solve(vander, a[:m].reshape(m, -1))
        hi_coef = np.linalg.solve(vander, a[-m:][::-1].reshape(m, -1))
        ext = np.vander(-np.arange(pad, 0, -1.0), m)         # indices -pad .. -1
        lo = (ext @ lo_coef).reshape((pad,) + a.shape[1:])
        hi = (ext @ hi_coef).reshape((pad,) + a.shape[1:])[::-1]
        out = np.moveaxis(np.concatenate([lo, a, hi], axis=0), 0, ax)
    return out



@dataclass(frozen=True)
class DetuningInterpolant:
    """Cubic-spline interpolant of Delta f_dark(t) on a regular tip grid.

    Build with :meth:`from_map`.  Calls are vectorised over points of shape
    (..., 3) = (x, y, z) in nm; values in Hz, gradients in Hz/nm.  NaN
    outside the grid's box.

    The spline is a tensor cubic B-spline (``scipy.ndimage`` spline filter and
    ``map_coordinates``) of the map padded by 4 cells of cubic extrapolation
    (so the edges behave like a not-a-knot spline); the gradient is the
    spline's exact derivative at the nodes, itself cubic-spline interpolated
    (exact at the nodes; between them it differs from the value spline's
    derivative by ~ 840 (step / tip distance)^4, ~3e-3 relative for 3 nm
    steps at 70 nm from the tip).  Uniform steps are required.

    ``sigma`` (optional, the nodes' shape, Hz) is the one-sigma noise of every
    node (:func:`dark_detuning_sigma`); the interpolant is linear in the node
    values, value(t) = sum_ijk a_i(x) b_j(y) c_k(z) v_ijk, and
    :meth:`node_weights` gives the per-axis weights a, b, c, so a fit can
    propagate the nodes' noise into what it derives from the map.
    """

    axes: tuple[NDArray, NDArray, NDArray]
    values: NDArray = field(repr=False)
    sigma: NDArray | None = field(default=None, repr=False)
    _coef: tuple[NDArray, ...] = field(init=False, repr=False, compare=False)
    _origin: NDArray = field(init=False, repr=False, compare=False)
    _step: NDArray = field(init=False, repr=False, compare=False)
    _cardinal: list = field(init=False, repr=False, compare=False)
    _quartic: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps = []
        for a in self.axes:
            d = np.diff(a)
            if d.size and np.ptp(d) > 1e-6 * abs(d[0]):
                raise NvmriError("the PSF map needs uniform steps along x, y and z")
            steps.append(d[0] if d.size else 1.0)
        padded = _extrapolate_pad(np.asarray(self.values, float), _PAD)
        coef = ndimage.spline_filter(padded, order=3, mode="mirror")
        grads = []
        for ax in range(3):
            # exact spline derivative at the (padded) nodes: along ``ax`` the
            # B-spline derivative weights (-1/2, 0, 1/2), along the others the
            # B-spline node weights (1/6, 2/3, 1/6)
            dvals = ndimage.correlate1d(coef, [-0.5, 0.0, 0.5], axis=ax, mode="mirror")
            for other in range(3):
                if other != ax:
                    dvals = ndimage.correlate1d(dvals, [1 / 6, 2 / 3, 1 / 6], axis=other,
                                                mode="mirror")
            grads.append(ndimage.spline_filter(dvals / steps[ax], order=3, mode="mirror"))
        object.__setattr__(self, "_coef", (coef, *grads))
        object.__setattr__(self, "_origin", np.array([a[0] for a in self.axes]))
        object.__setattr__(self, "_step", np.array(steps, float))
        object.__setattr__(self, "_cardinal", [None, None, None])
        object.__setattr__(self, "_quartic", [])
        if self.sigma is not None and np.shape(self.sigma) != np.shape(self.values):
            raise NvmriError("the PSF map's sigma must have the nodes' shape")

    @classmethod
    def from_map(cls, detuning: xr.DataArray, sigma: xr.DataArray | None = None
                 ) -> DetuningInterpolant:
        """From a DataArray on coords ``x``, ``y``, ``z`` (any dim order), Hz.

        Every axis needs >= 3 points (a cubic spline; a map that stopped
        descending after 3 planes is extrapolated by the parabola through
        them).  ``sigma``: the nodes' noise on the same coords
        (:func:`dark_detuning_sigma`), optional; a gap filled from its
        nearest node gets the largest sigma of the map times 10 (its value is
        that far from being measured).
        """
        missing = [a for a in AXES if a not in detuning.dims]
        if missing:
            raise NvmriError(f"detuning map needs dims x, y, z (missing {missing})")
        da = detuning.transpose(*AXES).sortby(list(AXES))
        planes = _complete_planes(da)
        da = da.isel(z=planes)
        axes = tuple(np.asarray(da[a].values, float) for a in AXES)
        if min(len(a) for a in axes) < 3:
            raise NvmriError("the PSF map needs at least 3 points along x, y and z")
        raw = np.asarray(da.values, float)
        sig = None
        if sigma is not None:
            sig = np.asarray(sigma.transpose(*AXES).sortby(list(AXES)).isel(z=planes).values,
                             float)
            if sig.shape != raw.shape:
                raise NvmriError("the PSF map's sigma must be on the map's grid")
            bad = ~np.isfinite(raw) | ~np.isfinite(sig)
            top = float(np.max(sig[~bad])) if (~bad).any() else 0.0
            sig = np.where(bad, 10.0 * top, sig)
        return cls(axes=axes, values=_fill_nans(raw), sigma=sig)

    @property
    def bounds(self) -> NDArray:
        """Box of the grid, shape (3, 2): [[xmin, xmax], [ymin, ymax], [zmin, zmax]] nm."""
        return np.array([[a[0], a[-1]] for a in self.axes])

    def _index(self, points: ArrayLike) -> tuple[NDArray, NDArray, tuple[int, ...]]:
        p = np.asarray(points, float)
        flat = p.reshape(-1, 3)
        b = self.bounds
        tol = 1e-9 * self._step
        inside = np.all((flat >= b[:, 0] - tol) & (flat <= b[:, 1] + tol), axis=1)
        idx = ((flat - self._origin) / self._step + _PAD).T
        return idx, inside, p.shape[:-1]

    def _eval(self, coef: NDArray, idx: NDArray, inside: NDArray) -> NDArray:
        out = np.full(idx.shape[1], np.nan)
        if inside.any():
            out[inside] = ndimage.map_coordinates(coef, idx[:, inside], order=3,
                                                  prefilter=False, mode="mirror")
        return out

    def __call__(self, points: ArrayLike) -> NDArray:
        """Delta f_dark at ``points`` (..., 3), Hz; NaN outside."""
        idx, inside, shape = self._index(points)
        return self._eval(self._coef[0], idx, inside).reshape(shape)

    def at_offsets(self, tips: ArrayLike, grid_axes: Sequence[ArrayLike]) -> NDArray:
        """Delta f_dark at every ``tips[p] - g``, g on the grid of ``grid_axes``, Hz.

        The same values as ``self(tips[None, :, :] - grid[:, None, :])`` with
        ``grid`` the points of ``grid_axes[0] x grid_axes[1] x grid_axes[2]``
        (``meshgrid(..., indexing="ij")``, x slowest), the same NaN outside the
        map, equal to rounding (~1e-16 relative: another summation order).  For
        one tip the points ``tips[p] - g`` are a product grid, and the cubic
        spline is a tensor product, so the values are three small contractions
        of the coefficients instead of 64 of them per point (a matched filter
        over a 4e6-point grid x raster: ~10x less CPU than :meth:`__call__`).

        Parameters
        ----------
        tips : array_like (P, 3)
            Tip positions, nm.
        grid_axes : three array_like
            Offset grid axes x, y, z, nm.

        Returns
        -------
        ndarray (G, P)
            G = the product of the axes' lengths, in ``meshgrid(indexing="ij")`` order.
        """
        tips = np.asarray(tips, float).reshape(-1, 3)
        coef = self._coef[0]
        b = self.bounds
        index, weights, inside = [], [], []
        for d in range(3):
            values, inverse = np.unique(tips[:, d], return_inverse=True)
            x = values[:, None] - np.asarray(grid_axes[d], float)[None, :]
            tol = 1e-9 * self._step[d]
            inside.append((x >= b[d, 0] - tol) & (x <= b[d, 1] + tol))
            w = _cubic_weights((x - self._origin[d]) / self._step[d] + _PAD, coef.shape[d])
            index.append(inverse.reshape(-1))
            weights.append(w)
        wx, wy, wz = weights
        ix, iy, iz = index
        along_z = np.einsum("wck,ijk->wijc", wz, coef)                   # (Wz, I, J, Gz)
        along_yz = np.einsum("vbj,wijc->vwibc", wy, along_z)             # (Wy, Wz, I, Gy, Gz)
        n_x, n_y, n_z = (len(a) for a in grid_axes)
        out = np.matmul(wx[ix], along_yz[iy, iz].reshape(len(tips), coef.shape[0], n_y * n_z))
        out = out.reshape(len(tips), n_x, n_y, n_z)
        ok = (inside[0][ix][:, :, None, None] & inside[1][iy][:, None, :, None]
              & inside[2][iz][:, None, None, :])
        out[~ok] = np.nan
        return np.ascontiguousarray(out.reshape(len(tips), -1).T)

    def gradient(self, points: ArrayLike) -> NDArray:
        """d(Delta f_dark)/dt at ``points`` (..., 3) -> (..., 3), Hz/nm; NaN outside."""
        idx, inside, shape = self._index(points)
        g = np.stack([self._eval(c, idx, inside) for c in self._coef[1:]], axis=-1)
        return g.reshape(shape + (3,))

    def value_and_gradient(self, points: ArrayLike) -> tuple[NDArray, NDArray]:
        """Both at once (one index computation)."""
        idx, inside, shape = self._index(points)
        v = self._eval(self._coef[0], idx, inside).reshape(shape)
        g = np.stack([self._eval(c, idx, inside) for c in self._coef[1:]], axis=-1)
        return v, g.reshape(shape + (3,))

    def interpolation_error(self, points: ArrayLike) -> NDArray:
        """Estimated interpolation error of the spline at ``points`` (..., 3), Hz.

        The difference between a quartic and this cubic B-spline through the
        same nodes (same padding).  On the protocol's single-spin grid it
        tracks the cubic spline's error against the exact physics (where the
        zoom raster images the Fig. 4 spin: 138 kHz against the true 155 kHz;
        the quartic's own error is 18 kHz there), so it serves as the scale of
        the interpolation error a fit should carry as a systematic.  NaN
        outside the map.
        """
        if not self._quartic:
            padded = _extrapolate_pad(np.asarray(self.values, float), _PAD)
            self._quartic.append(ndimage.spline_filter(padded, order=4, mode="mirror"))
        idx, inside, shape = self._index(points)
        out = np.full(idx.shape[1], np.nan)
        if inside.any():
            quartic = ndimage.map_coordinates(self._quartic[0], idx[:, inside], order=4,
                                              prefilter=False, mode="mirror")
            out[inside] = quartic - self._eval(self._coef[0], idx, inside)[inside]
        return out.reshape(shape)

    def _axis_cardinal(self, ax: int) -> NDArray:
        """B-spline coefficients (n + 2 pad, n) of the unit node vectors along axis ``ax``.

        The interpolant is a tensor product of one linear operator per axis
        (cubic extrapolation pad, then the B-spline filter), so column i is
        the 1-D spline coefficients of the node vector e_i.
        """
        cached = self._cardinal[ax]
        if cached is None:
            n = len(self.axes[ax])
            eye = np.eye(n)
            cols = []
            for i in range(n):
                padded = _extrapolate_pad(eye[i], _PAD)
                cols.append(ndimage.spline_filter1d(padded, order=3, mode="mirror"))
            cached = np.stack(cols, axis=-1)
            self._cardinal[ax] = cached
        return cached

    def node_weights(self, points: ArrayLike) -> tuple[NDArray, NDArray, NDArray]:
        """Per-axis weights of the nodes in the value at ``points`` (P, 3).

        Returns
        -------
        (a, b, c) : ndarrays (P, nx), (P, ny), (P, nz)
            value(p) = sum_ijk a[p, i] b[p, j] c[p, k] values[i, j, k] (to
            rounding); rows of points outside the map are NaN.
        """
        idx, inside, _ = self._index(np.asarray(points, float).reshape(-1, 3))
        out = []
        for ax in range(3):
            coef = self._axis_cardinal(ax)
            x = idx[ax]
            base = np.floor(x).astype(int)
            w = np.zeros((x.size, coef.shape[1]))
            for k in range(-1, 3):
                j = np.clip(base + k, 0, coef.shape[0] - 1)
                t = np.abs(x - (base + k))
                b3 = np.where(t < 1.0, 2.0 / 3.0 - t**2 + 0.5 * t**3,
                              np.where(t < 2.0, (2.0 - t) ** 3 / 6.0, 0.0))
                w += b3[:, None] * coef[j]
            w[~inside] = np.nan
            out.append(w)
        return out[0], out[1], out[2]
