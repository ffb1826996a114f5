"""Fig. 2 analyses: Ramsey fringe period and gradient, CW-ESR slice width, field gradients.

* Ramsey linecut (MW fixed, tip moved): P0(y) = (1 + A cos(2 pi (f+(y) - f_mw) tau))/2,
  so the local fringe period is 1/(tau |d f+/dy|).  :func:`ramsey_local_periods`
  fits a sinusoid with a linear chirp in sliding windows; the shortest local
  period and its sigma come from the window where it is shortest.  The implied
  gradient (physics.gradient_from_spatial_width) is 1/(gamma tau period).
  That is the paper's Fig. 2a gradient (report.json ``gradient_gauss_per_nm``).
  With the exact Hamiltonian and B0 just above the level anticrossing the
  fringes follow grad f+, which equals gamma grad(B_par) only for tip fields
  along the NV axis: it is an "f+-equivalent" gradient.  The exact field
  gradient (``field_gradient_gauss_per_nm``) comes from a two-transition
  (PSF) map: :func:`field_gradient_map`.
* CW-ESR slice (MW fixed, CW ODMR counts along a linecut): the dip in position
  is a Lorentzian of FWHM 1/(tau_cw gamma |grad|) where the gradient is
  constant across it; :func:`cw_slice_fwhm` fits it to the counts (Poisson
  weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError

__all__ = [
    "LocalPeriods", "ramsey_local_periods", "shortest_fringe_period", "fringe_gradient",
    "SliceFit", "cw_slice_fwhm", "field_gradient_map", "TESLA_TO_GAUSS", "gradient_crossing",
]

TESLA_TO_GAUSS = 1e4


@dataclass(frozen=True)
class LocalPeriods:
    """Sliding-window sinusoid fits along a Ramsey linecut.

    Attributes
    ----------
    centre_nm : ndarray (k,)
        Window centres, nm.
    period_nm, period_sigma_nm : ndarray (k,)
        Local fringe period at the centre and its one-sigma error, nm.
    visibility : ndarray (k,)
        Fitted fringe amplitude in P0 (0.5 for ideal full contrast).
    """

    centre_nm: NDArray
    period_nm: NDArray
    period_sigma_nm: NDArray
    visibility: NDArray


def ramsey_local_periods(position_nm: ArrayLike, p0: ArrayLike, sigma: ArrayLike | None = None,
                         window: int = 24, stride: int | None = None,
                         min_visibility_snr: float = 4.0) -> LocalPeriods:
    """Local fringe period along a linecut by windowed chirped-sinusoid fits.

    Model in a window centred at yc:
    P0 = a + b cos(2 pi [k (y - yc) + kappa (y - yc)^2 / 2] + phi), local
    period 1/|k| at yc.  The start value of k is the periodogram maximum of
    the window.

    Parameters
    ----------
    position_nm : array_like (n,)
        Tip positions along the line (sorted or not), nm.
    p0 : array_like (n,)
        Normalised population (or any fringe signal).
    sigma : array_like (n,), optional
        One-sigma errors (default: estimated from the residuals).
    window : int
        Samples per window (should span >= 2 fringes; the sampling needs >= 3
        samples per fringe).
    stride : int, optional
        Samples between window starts (default window // 4).
    min_visibility_snr : float
        Windows whose fitted amplitude is below this many sigmas are dropped.

    Returns
    -------
    LocalPeriods
    """
    y = np.asarray(position_nm, float)
    v = np.asarray(p0, float)
    s = None if sigma is None else np.asarray(sigma, float)
    order = np.argsort(y)
    y, v = y[order], v[order]
    s = None if s is None else s[order]
    ok = np.isfinite(v) & np.isfinite(y) & (True if s is None else np.isfinite(s) & (s > 0))
    y, v = y[ok], v[ok]
    s = None if s is None else s[ok]
    if y.size < window:
        raise NvmriError(f"Ramsey linecut has {y.size} valid points, fewer than one window")
    stride = max(window // 4, 1) if stride is None else stride
    cen, per, sper, vis = [], [], [], []
    for i0 in range(0, y.size - window + 1, stride):
        yy, vv = y[i0:i0 + window], v[i0:i0 + window]
        ss = None if s is None else s[i0:i0 + window]
        yc = float(np.mean(yy))
        u = yy - yc
        span = float(np.ptp(yy))
        dy = span / (window - 1)
        ks = np.linspace(0.5 / span, 0.5 / dy, 400)
        vv0 = vv - vv.mean()
        power = np.abs(np.exp(-2j * np.pi * np.outer(ks, u)) @ vv0)
        k0 = float(ks[np.argmax(power)])
        c0 = np.exp(-2j * np.pi * k0 * u) @ vv0 * 2.0 / window
        b0, ph0 = float(np.abs(c0)), float(np.angle(c0))

        def model(uu, a, b, k, kap, ph):
            return a + b * np.cos(2 * np.pi * (k * uu + 0.5 * kap * uu**2) + ph)

        try:
            popt, pcov = optimize.curve_fit(model, u, vv, p0=[vv.mean(), b0, k0, 0.0, ph0],
                                            sigma=ss, absolute_sigma=ss is not None,
                                            maxfev=5000)
        except (RuntimeError, optimize.OptimizeWarning):
            continue
        err = np.sqrt(np.abs(np.diag(pcov)))
        if not np.all(np.isfinite(err)) or abs(popt[1]) < min_visibility_snr * err[1]:
            continue
        k, sk = abs(popt[2]), err[2]
        if not 0.5 / span < k < 0.5 / dy:
            continue
        cen.append(yc)
        per.append(1.0 / k)
        sper.append(sk / k**2)
        vis.append(abs(popt[1]))
    if not cen:
        raise NvmriError("no Ramsey window gave a significant fringe fit")
    return LocalPeriods(np.array(cen), np.array(per), np.array(sper), np.array(vis))


def shortest_fringe_period(periods: LocalPeriods) -> tuple[float, float, float]:
    """(period, sigma, position) of the shortest local fringe period, nm.

    Picks the window with the smallest period among those whose period is
    determined to better than 20 % (to avoid a noise-driven minimum).
    """
    good = periods.period_sigma_nm < 0.2 * periods.period_nm
    if not good.any():
        good = np.ones_like(good)
    idx = np.flatnonzero(good)[np.argmin(periods.period_nm[good])]
    return (float(periods.period_nm[idx]), float(periods.period_sigma_nm[idx]),
            float(periods.centre_nm[idx]))


def fringe_gradient(period_nm: float, period_sigma_nm: float, tau_s: float
                    ) -> tuple[float, float]:
    """Gradient implied by a fringe period, 1/(gamma tau period), in G/nm with sigma.

    This is |grad f+| / gamma_e (the "f+-equivalent" field gradient, see the
    module doc).
    """
    g = float(physics.gradient_from_spatial_width(tau_s, period_nm)) * TESLA_TO_GAUSS
    return g, g * period_sigma_nm / period_nm


@dataclass(frozen=True)
class SliceFit:
    """Lorentzian dip in position: centre, FWHM (nm), depth, with sigmas; chi2_reduced."""

    centre_nm: float
    centre_sigma_nm: float
    fwhm_nm: float
    fwhm_sigma_nm: float
    depth: float
    depth_sigma: float
    chi2_reduced: float

    def gradient_gauss_per_nm(self, tau_cw_s: float) -> tuple[float, float]:
        """|grad B| implied by the slice width, 1/(gamma tau_cw FWHM), G/nm with sigma."""
        g = float(physics.gradient_from_spatial_width(tau_cw_s, self.fwhm_nm)) * TESLA_TO_GAUSS
        return g, g * self.fwhm_sigma_nm / self.fwhm_nm


def cw_slice_fwhm(position_nm: ArrayLike, counts: ArrayLike,
                  reference: ArrayLike | None = None, window_nm: float | None = None
                  ) -> SliceFit:
    """FWHM of a CW-ESR resonant slice along a linecut, from counts.

    Fits counts = I0 [1 - d L(y - y0; FWHM)] (physics.lorentzian) around the
    deepest dip, weights 1/counts (Poisson).  With a ``reference`` gate (MW
    off) the ratio counts/reference is fitted instead (I0 = 1), with the
    variance of a ratio of Poisson counts.

    Parameters
    ----------
    position_nm : array_like (n,)
    counts : array_like (n,)
        CW ODMR counts per point.
    reference : array_like (n,), optional
        MW-off counts of the same points.
    window_nm : float, optional
        Fit only +/- this around the deepest point (default: all).

    Returns
    -------
    SliceFit
    """
    y = np.asarray(position_nm, float)
    n = np.asarray(counts, float)
    if reference is not None:
        r = np.asarray(reference, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            val = n / r
            sig = val * np.sqrt(1.0 / np.maximum(n, 1.0) + 1.0 / np.maximum(r, 1.0))
    else:
        val, sig = n, np.sqrt(np.maximum(n, 1.0))
    ok = np.isfinite(val) & np.isfinite(sig) & (sig > 0)
    y, val, sig = y[ok], val[ok], sig[ok]
    order = np.argsort(y)
    y, val, sig = y[order], val[order], sig[order]
    if y.size < 6:
        raise NvmriError("CW linecut has fewer than 6 valid points")
    k = max(3, y.size // 30)
    smooth = np.convolve(val, np.ones(k) / k, mode="same")
    i_min = int(np.argmin(smooth[k:-k]) + k) if y.size > 2 * k + 1 else int(np.argmin(smooth))
    if window_nm is not None:
        sel = np.abs(y - y[i_min]) <= window_nm
        y, val, sig, smooth = y[sel], val[sel], sig[sel], smooth[sel]
        i_min = int(np.argmin(smooth))
    base = float(np.median(val))
    depth0 = max(1.0 - smooth[i_min] / base, 1e-3)
    half = base * (1.0 - depth0 / 2.0)
    below = np.flatnonzero(smooth <= half)
    w0 = float(np.ptp(y[below])) if below.size > 1 else 3.0 * float(np.median(np.diff(y)))

    def model(yy, i0, y0, w, d):
        return i0 * (1.0 - d * physics.lorentzian(yy - y0, abs(w)))

    try:
        popt, pcov = optimize.curve_fit(model, y, val, p0=[base, y[i_min], w0, depth0],
                                        sigma=sig, absolute_sigma=True, maxfev=20000)
    except (RuntimeError, optimize.OptimizeWarning) as exc:
        raise NvmriError(f"CW slice fit did not converge: {exc}") from None
    chi2 = float(np.sum(((val - model(y, *popt)) / sig) ** 2) / max(y.size - 4, 1))
    err = np.sqrt(np.abs(np.diag(pcov))) * np.sqrt(max(chi2, 1.0))
    return SliceFit(centre_nm=float(popt[1]), centre_sigma_nm=float(err[1]),
                    fwhm_nm=float(abs(popt[2])), fwhm_sigma_nm=float(err[2]),
                    depth=float(popt[3]), depth_sigma=float(err[3]), chi2_reduced=chi2)


def field_gradient_map(psf_map: xr.Dataset, along: str = "y",
                       d_hz: float = physics.D_ZFS) -> xr.Dataset:
    """True field gradients from a two-transition lock map, G/nm.

    B_par and B_perp of the total field (physics.field_from_transitions) at
    every tip position; their derivatives along ``along`` by second-order
    finite differences of the map's coordinate (np.gradient).  d(B_par)/d
    ``along`` is the paper's gradient (of the field along the NV axis);
    ``dfplus_equiv`` is d f+/d ``along`` / gamma_e, what Ramsey fringes measure.

    Parameters
    ----------
    psf_map : xarray.Dataset
        ``lock_frequency``, ``lock_f_minus`` on coords including ``along``.
    along : str
        Coordinate to differentiate along.
    d_hz : float

    Returns
    -------
    xarray.Dataset
        ``dbpar`` (dB_par/d along), ``dbperp``, ``dfplus_equiv``, G/nm.
    """
    for k in ("lock_frequency", "lock_f_minus"):
        if k not in psf_map:
            raise NvmriError(f"field gradients need {k!r} in the map")
    fp, fm = psf_map["lock_frequency"], psf_map["lock_f_minus"]
    if psf_map.sizes.get(along, 0) < 3:
        raise NvmriError(f"the map needs >= 3 points along {along!r}")
    b_par, b_perp = physics.field_from_transitions(fp.values, fm.values, d_hz)
    ax = fp.dims.index(along)
    coord = np.asarray(psf_map[along].values, float)

    def grad(a: NDArray) -> NDArray:
        return np.gradient(a, coord, axis=ax) * TESLA_TO_GAUSS

    out = xr.Dataset({"dbpar": (fp.dims, grad(b_par)), "dbperp": (fp.dims, grad(b_perp)),
                      "dfplus_equiv": (fp.dims, grad(fp.values / physics.GAMMA_E))},
                     coords=fp.coords)
    for k in out.data_vars:
        out[k].attrs["units"] = "G/nm"
    return out


def gradient_crossing(coord_nm: ArrayLike, fplus_equiv: ArrayLike, exact: ArrayLike,
                      target_g_per_nm: float) -> float:
    """Where along a lock line the f+-equivalent gradient crosses a target, nm.

    A CW slice's width measures the f+-equivalent gradient (the paper's
    linear-Zeeman convention), so Fig. 2b's "12 G/nm" point is where
    |d f+/dx| / gamma_e = target.  Of all crossings (linear interpolation
    between samples) the one where the exact gradient of B_par agrees best
    with it is returned: there the slice means the same under both
    conventions.

    Parameters
    ----------
    coord_nm : array_like (n,)
        Positions along the line, sorted, nm.
    fplus_equiv, exact : array_like (n,)
        ``field_gradient_map(...)["dfplus_equiv"]`` and ``["dbpar"]`` there, G/nm.
    target_g_per_nm : float

    Returns
    -------
    float
        The crossing's position, nm.
    """
    x = np.asarray(coord_nm, float)
    g = np.abs(np.asarray(fplus_equiv, float)) - target_g_per_nm
    e = np.abs(np.asarray(exact, float))
    idx = np.flatnonzero(np.isfinite(g[:-1]) & np.isfinite(g[1:]) & (g[:-1] * g[1:] <= 0)
                         & (g[:-1] != g[1:]))
    if idx.size == 0:
        raise NvmriError(f"the f+-equivalent gradient never reaches {target_g_per_nm:g} G/nm "
                         "on the line")
    frac = g[idx] / (g[idx] - g[idx + 1])
    where = x[idx] + frac * (x[idx + 1] - x[idx])
    mismatch = np.abs(e[idx] + frac * (e[idx + 1] - e[idx]) - target_g_per_nm)
    return float(where[np.argmin(mismatch)])
