"""The dark-spin point-spread function from measured maps: no tip model anywhere.

Pieces (all from measurements):

1. **Dark-frequency map.**  A ``psf_map`` run locks both NV transitions at every
   tip position t.  :func:`physics.dark_spin_frequency_from_transitions` turns
   (f+, f-) into gamma_e |B| exactly (B0 = 0.12 T sits just above the
   ground-state level anticrossing, so the ms=0->+1 shift alone would be off
   by tens of MHz wherever the tip field has a component across the NV axis).
   The map is referenced to the retracted-tip pair ``f_nv0_hz``,
   ``f_minus0_hz``: Delta f_dark(t) = gamma|B|(t) - gamma|B|(far), so a
   miscalibrated zero-field splitting D cancels to first order.
   (:func:`dark_detuning_map`, :class:`DetuningInterpolant`.)
2. **Dark-spin line.**  A tip-free ``deer_spectrum`` (RF sweep) fitted with a
   Lorentzian (:func:`fit_lorentzian`: centre f_dark0, FWHM, amplitude) and with
   the pi-pulse flip-probability model of physics.md,
   ``physics.dark_flip_probability`` with the known RF pulse length and the
   dark-spin T2* free (:func:`fit_flip_line` -> :class:`FlipLine`).  The flip
   model's T2* is what the PSF uses ("the measured line width").
3. **PSF.**  PSF(t) = p(f_rf - f_dark0 - Delta f_dark(t)) (:class:`DarkSpinPSF`),
   evaluated anywhere inside the PSF map's box by a cubic tensor B-spline
   (``scipy.ndimage`` spline filter + ``map_coordinates``), with spline
   gradients.

Outside the PSF map's box the interpolant returns NaN (never extrapolates):
callers either restrict offsets to where t - r' stays inside (the
localisation does, see :func:`feasible_offset_box`) or treat NaN as "no
information".  Gaps (NaN locks) inside the map are filled from the nearest
valid point before the spline is built, if they are at most 5 % of the map.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage, optimize

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.counts import check_gates, deer_contrast_dataset, valid_points

__all__ = [
    "dark_detuning_map", "dark_detuning_sigma", "DetuningInterpolant", "FlipLine", "LorentzianFit",
    "fit_lorentzian", "fit_flip_line", "fit_deer_spectrum", "DarkSpinPSF",
    "feasible_offset_box",
]

AXES = ("x", "y", "z")


# --------------------------------------------------------------------------- #
# 1. dark-frequency map
# --------------------------------------------------------------------------- #

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


# --------------------------------------------------------------------------- #
# 2. the dark-spin line
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class FlipLine:
    """Tip-free dark-spin RF response: p(Delta) = physics.dark_flip_probability.

    Attributes
    ----------
    centre_hz : float
        f_dark0, the tip-free dark-spin line centre, Hz.
    t2_star_s : float
        Dark-spin T2* (Lorentzian FWHM 1/T2*) fitted with the pulse length fixed, s.
    t_pi_s : float
        RF pi-pulse length (the ``rf_duration_s`` of the runs), s.
    amplitude : float
        Fitted amplitude of the spectrum (w for a single spin), dimensionless.
    centre_sigma_hz, t2_star_sigma_s, amplitude_sigma : float
        One-sigma uncertainties (0 when the line was given, not fitted).
    """

    centre_hz: float
    t2_star_s: float = 150e-9
    t_pi_s: float = 100e-9
    amplitude: float = float("nan")
    centre_sigma_hz: float = 0.0
    t2_star_sigma_s: float = 0.0
    amplitude_sigma: float = 0.0

    def probability(self, detuning_hz: ArrayLike) -> NDArray:
        """Flip probability at detuning f_rf - f_spin (Hz), any shape."""
        return physics.dark_flip_probability(detuning_hz, self.t_pi_s, self.t2_star_s)

    def derivative(self, detuning_hz: ArrayLike) -> NDArray:
        """dp/dDelta, 1/Hz, by a central difference of 2 % of the FWHM."""
        h = 0.02 * self.fwhm_hz
        d = np.asarray(detuning_hz, float)
        return (self.probability(d + h) - self.probability(d - h)) / (2.0 * h)

    @property
    def peak(self) -> float:
        """p(0), the on-resonance flip probability."""
        return float(self.probability(0.0))

    @property
    def fwhm_hz(self) -> float:
        """Full width at half maximum of p, Hz (numerical)."""
        return _flip_fwhm(self.t_pi_s, self.t2_star_s)


def _flip_fwhm(t_pi_s: float, t2s_s: float) -> float:
    span = 4.0 * (1.0 / t_pi_s + 1.0 / t2s_s)
    d = np.linspace(0.0, span, 20001)
    p = physics.dark_flip_probability(d, t_pi_s, t2s_s)
    half = 0.5 * p[0]
    i = int(np.argmax(p < half))
    x0, x1, p0, p1 = d[i - 1], d[i], p[i - 1], p[i]
    return float(2.0 * (x0 + (half - p0) * (x1 - x0) / (p1 - p0)))


@dataclass(frozen=True)
class LorentzianFit:
    """Lorentzian fit ``baseline + amplitude * physics.lorentzian(f - centre, fwhm)``.

    Attributes (each with a ``*_sigma`` one-sigma uncertainty): ``centre_hz``,
    ``fwhm_hz``, ``amplitude``, ``baseline``; ``chi2_reduced`` of the fit
    (sigmas are scaled by sqrt(chi2_reduced) when it exceeds 1).
    """

    centre_hz: float
    fwhm_hz: float
    amplitude: float
    baseline: float
    centre_sigma_hz: float
    fwhm_sigma_hz: float
    amplitude_sigma: float
    baseline_sigma: float
    chi2_reduced: float


def _initial_peak(f: NDArray, y: NDArray) -> tuple[float, float, float, float]:
    order = np.argsort(f)
    f, y = f[order], y[order]
    base = float(np.median(y))
    k = max(1, len(y) // 15)
    sm = np.convolve(y - base, np.ones(k) / k, mode="same")
    i = int(np.argmax(sm))
    amp = float(sm[i])
    above = np.where(sm >= 0.5 * amp)[0]
    width = float(f[above.max()] - f[above.min()]) if above.size > 1 else float(np.ptp(f)) / 10
    return float(f[i]), max(width, 2.0 * float(np.median(np.diff(f)))), amp, base


def _finite_sigma(x: NDArray, y: NDArray, s: NDArray | None) -> tuple[NDArray, ...]:
    s = np.ones_like(y) if s is None else np.broadcast_to(np.asarray(s, float), y.shape)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(s) & (s > 0)
    if ok.sum() < 5:
        raise NvmriError("fewer than 5 valid points to fit a line")
    return x[ok], y[ok], s[ok]


def fit_lorentzian(frequency_hz: ArrayLike, value: ArrayLike,
                   sigma: ArrayLike | None = None,
                   initial: tuple[float, float, float, float] | None = None) -> LorentzianFit:
    """Weighted least-squares Lorentzian fit of a resonance peak (e.g. an ESR sweep).

    Parameters
    ----------
    frequency_hz : array_like, shape (n,)
        Sweep axis (any unit; results in the same unit).
    value : array_like, shape (n,)
        Peak-up signal (e.g. DEER contrast).
    sigma : array_like, optional
        One-sigma errors of ``value`` (default 1: then the sigmas come from
        the residual scatter).
    initial : (centre, fwhm, amplitude, baseline), optional
        Start values (default: from the smoothed maximum and half-width).

    Returns
    -------
    LorentzianFit

    Raises
    ------
    NvmriError
        If the fit does not converge.
    """
    x, y, s = _finite_sigma(np.asarray(frequency_hz, float), np.asarray(value, float),
                            None if sigma is None else np.asarray(sigma, float))
    c0, w0, a0, b0 = _initial_peak(x, y) if initial is None else initial

    def model(f, c, w, a, b):
        return b + a * physics.lorentzian(f - c, abs(w))

    try:
        popt, pcov = optimize.curve_fit(model, x, y, p0=[c0, w0, a0, b0], sigma=s,
                                        absolute_sigma=True, maxfev=20000)
    except (RuntimeError, optimize.OptimizeWarning) as exc:
        raise NvmriError(f"Lorentzian fit did not converge: {exc}") from None
    chi2 = float(np.sum(((y - model(x, *popt)) / s) ** 2) / max(len(x) - 4, 1))
    err = np.sqrt(np.diag(pcov)) * (np.sqrt(max(chi2, 1.0)) if sigma is not None
                                    else np.sqrt(chi2))
    return LorentzianFit(centre_hz=float(popt[0]), fwhm_hz=float(abs(popt[1])),
                         amplitude=float(popt[2]), baseline=float(popt[3]),
                         centre_sigma_hz=float(err[0]), fwhm_sigma_hz=float(err[1]),
                         amplitude_sigma=float(err[2]), baseline_sigma=float(err[3]),
                         chi2_reduced=chi2)


def fit_flip_line(frequency_hz: ArrayLike, value: ArrayLike, sigma: ArrayLike | None,
                  t_pi_s: float, model: Literal["single", "bath"] = "single",
                  baseline: bool = True) -> FlipLine:
    """Fit the flip-probability line model to a tip-free DEER spectrum.

    ``single``: c(f) = b + A p(f - f0) (one coupled spin, A = w).
    ``bath``:   c(f) = b + 1 - exp(-A p(f - f0)) (ensemble average over a
    Poisson bath of spins, which saturates; A = sum of w).
    p = ``physics.dark_flip_probability(., t_pi_s, T2*)`` with T2* free.

    Parameters
    ----------
    frequency_hz, value, sigma : array_like, shape (n,)
        RF frequencies (Hz), DEER contrast and its one-sigma errors.
    t_pi_s : float
        RF pi-pulse length of the sweep, s.
    model : {"single", "bath"}
    baseline : bool
        Fit a constant baseline b (else b = 0).

    Returns
    -------
    FlipLine
        Centre = f_dark0 and T2* with sigmas (scaled by sqrt(chi2_red) if > 1).
    """
    x, y, s = _finite_sigma(np.asarray(frequency_hz, float), np.asarray(value, float),
                            None if sigma is None else np.asarray(sigma, float))
    c0, w0, a_lor, b_lor = _initial_peak(x, y)
    scale = 1e6
    width0 = 1.0 / 150e-9
    omega = 1.0 / (2.0 * t_pi_s)
    # guess the Lorentzian width from the peak's width minus the pulse broadening
    gamma0 = float(np.clip(w0 - 1.2 * omega, 0.3 * width0, 10.0 * width0))

    def curve(p: NDArray) -> NDArray:
        c, log_g, a = p[0] * scale, p[1], p[2]
        b = p[3] if baseline else 0.0
        prob = physics.dark_flip_probability(x - c, t_pi_s, 1.0 / np.exp(log_g))
        core = a * prob if model == "single" else 1.0 - np.exp(-a * prob)
        return b + core

    def resid(p: NDArray) -> NDArray:
        return (y - curve(p)) / s

    peak0 = float(physics.dark_flip_probability(0.0, t_pi_s, 1.0 / gamma0))
    a0 = max(a_lor, 1e-3) / peak0
    if model == "bath":
        a0 = -np.log(max(1.0 - min(a_lor, 0.95), 1e-3)) / peak0
    p0 = [c0 / scale, np.log(gamma0), a0] + ([b_lor] if baseline else [])
    lo = [-np.inf, np.log(1e4), 0.0] + ([-np.inf] if baseline else [])
    hi = [np.inf, np.log(1e9), np.inf] + ([np.inf] if baseline else [])
    res = optimize.least_squares(resid, p0, bounds=(lo, hi), x_scale="jac",
                                 diff_step=1e-4)
    dof = max(len(x) - len(p0), 1)
    chi2 = float(np.sum(res.fun**2) / dof)
    try:
        cov = np.linalg.inv(res.jac.T @ res.jac) * max(chi2, 1.0)
        err = np.sqrt(np.diag(cov))
    except np.linalg.LinAlgError:
        err = np.full(len(p0), np.nan)
    t2s = 1.0 / np.exp(res.x[1])
    return FlipLine(centre_hz=float(res.x[0] * scale), t2_star_s=float(t2s), t_pi_s=float(t_pi_s),
                    amplitude=float(res.x[2]), centre_sigma_hz=float(err[0] * scale),
                    t2_star_sigma_s=float(t2s * err[1]), amplitude_sigma=float(err[2]))


def fit_deer_spectrum(ds: xr.Dataset, coord: str = "rf_frequency",
                      model: Literal["single", "bath"] = "single"
                      ) -> tuple[LorentzianFit, FlipLine]:
    """Fit a tip-free ``deer_spectrum`` run: Lorentzian and flip-probability line.

    The Lorentzian is a weighted least-squares fit of the contrast (centre,
    FWHM, amplitude for the report).  The flip line (centre f_dark0, T2*,
    amplitude, baseline; model as :func:`fit_flip_line`) is fitted to the four
    gates' counts by Poisson maximum likelihood (one echo coherence for the
    sweep), so it is unbiased however noisy the contrast ratio is.

    Parameters
    ----------
    ds : xarray.Dataset
        Counts ``signal``, ``echo``, ``bright``, ``dark`` along ``coord`` (RF
        frequency, Hz); attrs ``rf_duration_s`` (the RF pi pulse, s), ``shots``.
    coord : str
        Name of the RF-frequency coordinate.
    model : {"single", "bath"}

    Returns
    -------
    (LorentzianFit, FlipLine)
    """
    from nvmri_bluesky.reconstruct._poisson import fit_sweep

    check_gates(ds)
    if coord not in ds.coords:
        raise NvmriError(f"DEER spectrum lacks the coordinate {coord!r}")
    con = deer_contrast_dataset(ds)
    f = np.asarray(ds[coord].values, float)
    c, s = con["contrast"].values, con["contrast_sigma"].values
    t_pi = float(ds.attrs.get("rf_duration_s", 100e-9))
    valid = np.asarray(valid_points(ds).values)
    counts = np.stack([np.asarray(ds[g].values, float)[valid]
                       for g in ("signal", "echo", "bright", "dark")])
    shots = np.broadcast_to(np.asarray(ds.attrs.get("shots", 1.0), float), valid.shape)[valid]
    fv = f[valid]
    ok = np.isfinite(c) & np.isfinite(s)
    if ok.sum() < 5:
        raise NvmriError("fewer than 5 valid points in the DEER spectrum")
    ref, w0, a_pk, b0 = _initial_peak(f[ok], c[ok])
    omega = 1.0 / (2.0 * t_pi)
    gamma0 = float(np.clip(w0 - 1.2 * omega, 2e6, 70e6))
    peak0 = float(physics.dark_flip_probability(0.0, t_pi, 1.0 / gamma0))
    a0 = max(a_pk, 1e-3) / peak0
    if model == "bath":
        a0 = -np.log(max(1.0 - min(a_pk, 0.95), 1e-3)) / peak0

    def curve(th: NDArray) -> NDArray:
        prob = physics.dark_flip_probability(fv - ref - th[0] * 1e6, t_pi, 1e-6 / th[1])
        core = th[2] * prob if model == "single" else 1.0 - np.exp(-th[2] * prob)
        return th[3] + core

    th0 = np.array([0.0, gamma0 / 1e6, a0, b0])
    fit = fit_sweep(counts, shots, curve, th0, np.array([-np.inf, 0.01, 0.0, -1.0]),
                    np.array([np.inf, 1e3, np.inf, 1.0]), np.array([0.02, 0.01, 1e-3, 1e-4]),
                    echo_per_point=False)
    g, sg = fit.theta[1], fit.theta_sigma[1]
    if not fit.theta[2] > 5.0 * fit.theta_sigma[2]:
        raise NvmriError(f"no significant dark-spin line in the DEER spectrum (amplitude "
                         f"{fit.theta[2]:.3g} +/- {fit.theta_sigma[2]:.2g}); is tau_s a "
                         "node of the coupling?")
    if not (fv.min() < ref + fit.theta[0] * 1e6 < fv.max()):
        raise NvmriError("the fitted dark-spin line centre lies outside the RF sweep")
    line = FlipLine(centre_hz=float(ref + fit.theta[0] * 1e6), t2_star_s=float(1e-6 / g),
                    t_pi_s=t_pi, amplitude=float(fit.theta[2]),
                    centre_sigma_hz=float(fit.theta_sigma[0] * 1e6),
                    t2_star_sigma_s=float(1e-6 * sg / g**2),
                    amplitude_sigma=float(fit.theta_sigma[2]))
    try:
        lor = fit_lorentzian(f, c, s, initial=(line.centre_hz, line.fwhm_hz,
                                               line.amplitude * line.peak, fit.theta[3]))
    except NvmriError as exc:
        warnings.warn(f"{exc}; Lorentzian values are NaN", stacklevel=2)
        nan = float("nan")
        lor = LorentzianFit(nan, nan, nan, nan, nan, nan, nan, nan, nan)
    return lor, line


# --------------------------------------------------------------------------- #
# 3. the PSF
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class DarkSpinPSF:
    """PSF(t) = p(f_rf - f_dark0 - Delta f_dark(t)) for one RF frequency.

    Attributes
    ----------
    detuning : DetuningInterpolant
        Measured Delta f_dark map.
    line : FlipLine
        Tip-free line: centre f_dark0, T2*, RF pi-pulse length.
    rf_frequency_hz : float
        RF carrier of the DEER raster, Hz.
    """

    detuning: DetuningInterpolant
    line: FlipLine
    rf_frequency_hz: float

    @property
    def rf_offset_hz(self) -> float:
        """f_rf - f_dark0, Hz: which Delta f_dark contour is resonant."""
        return float(self.rf_frequency_hz - self.line.centre_hz)

    def __call__(self, points: ArrayLike) -> NDArray:
        """PSF at tip positions ``points`` (..., 3) nm; NaN outside the PSF map."""
        return self.of_detuning(self.detuning(points))

    def of_detuning(self, detuning_hz: ArrayLike) -> NDArray:
        """PSF where the map gives Delta f_dark = ``detuning_hz`` (any shape, Hz)."""
        return self.line.probability(self.rf_offset_hz - np.asarray(detuning_hz, float))

    def value_and_gradient(self, points: ArrayLike) -> tuple[NDArray, NDArray]:
        """PSF (...) and dPSF/dt (..., 3) in 1/nm at ``points`` (..., 3)."""
        f, grad = self.detuning.value_and_gradient(points)
        det = self.rf_offset_hz - f
        v = self.line.probability(det)
        g = -self.line.derivative(det)[..., None] * grad
        return v, g

    def at_offset(self, tips: ArrayLike, offset: ArrayLike) -> NDArray:
        """Signal pattern of a spin at ``offset`` r' (3,) seen from ``tips`` (..., 3)."""
        return self(np.asarray(tips, float) - np.asarray(offset, float))

    def slice_widths(self, points: ArrayLike) -> tuple[NDArray, NDArray]:
        """Lateral and vertical FWHM of the resonant slice at ``points``, nm.

        FWHM_f / |grad_xy Delta f_dark| and FWHM_f / |d Delta f_dark / dz|,
        FWHM_f the width of the measured flip line (physics.md's
        1/(tau_eff gamma |grad B|) with 1/tau_eff -> the measured line FWHM).
        """
        g = self.detuning.gradient(points)
        fw = self.line.fwhm_hz
        with np.errstate(divide="ignore"):
            return fw / np.hypot(g[..., 0], g[..., 1]), fw / np.abs(g[..., 2])


def feasible_offset_box(tips: ArrayLike, detuning: DetuningInterpolant,
                        prior: ArrayLike | None = None) -> NDArray:
    """Offsets r' for which every t - r' (t in ``tips``) lies inside the PSF map.

    Parameters
    ----------
    tips : array_like, (..., 3)
        Tip positions of the raster(s), nm.
    detuning : DetuningInterpolant
    prior : array_like, (3, 2), optional
        Prior box [[dx_lo, dx_hi], [dy_lo, dy_hi], [dz_lo, dz_hi]] to intersect.

    Returns
    -------
    ndarray, (3, 2)
        [lo, hi] per axis; lo > hi on an axis means no offset is fully covered.
    """
    t = np.asarray(tips, float).reshape(-1, 3)
    b = detuning.bounds
    lo = t.max(axis=0) - b[:, 1]
    hi = t.min(axis=0) - b[:, 0]
    box = np.stack([lo, hi], axis=-1)
    if prior is not None:
        pr = np.asarray(prior, float)
        box = np.stack([np.maximum(box[:, 0], pr[:, 0]), np.minimum(box[:, 1], pr[:, 1])], -1)
    return box
