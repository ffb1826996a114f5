"""Fig. 2 quantities: tip field gradient, Ramsey fringe period, CW-ESR slice width.

All from line scans (1D rasters) read back from runs:

* a two-transition lock line (``psf_map`` along one axis) gives the tip field
  along the NV axis exactly (:func:`physics.field_from_transitions`), hence
  its gradient, with no tip model;
* a Ramsey line at a fixed MW frequency oscillates in space with period
  1/(tau |d f_nv / ds|) (the NV frequency's gradient: near 0.12 T, just above
  the level anticrossing, that is *not* gamma |d B_par / ds|; both are
  reported);
* a CW line at a fixed MW frequency dips where f_nv(s) = f_mw, a slice of
  FWHM 1/(tau_cw |d f_nv / ds|).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.psf import fit_lorentzian

__all__ = ["Measured", "field_along_axis", "gradient_peak", "fringe_period", "slice_fwhm"]


@dataclass(frozen=True)
class Measured:
    """A value with its one-sigma uncertainty (report.json's ``{"value", "sigma"}``)."""

    value: float
    sigma: float

    def as_dict(self) -> dict[str, float]:
        return {"value": float(self.value), "sigma": float(self.sigma)}


def field_along_axis(f_plus_hz: ArrayLike, f_minus_hz: ArrayLike) -> NDArray:
    """B_par (T) from the two locked transitions (signed f_minus), exactly."""
    return physics.field_from_transitions(f_plus_hz, f_minus_hz)[0]


def gradient_peak(s_nm: ArrayLike, values: ArrayLike, half_window: int = 3
                  ) -> tuple[Measured, float]:
    """Largest |d values / ds| on a line, from local straight-line fits.

    Parameters
    ----------
    s_nm : array_like, shape (n,)
        Positions along the line, nm (uniform steps).
    values : array_like, shape (n,)
        A smooth quantity sampled there (e.g. B_par in T or f in Hz).
    half_window : int
        Points on each side in each local fit.

    Returns
    -------
    (gradient, s_peak)
        |slope| at its largest (unit of ``values`` per nm) with the fit's
        sigma, and where it is, nm.
    """
    s, v = np.asarray(s_nm, float), np.asarray(values, float)
    ok = np.isfinite(v)
    s, v = s[ok], v[ok]
    k = 2 * half_window + 1
    if len(s) < k + 2:
        raise NvmriError(f"a line of {len(s)} valid points is too short for a gradient")
    best = None
    for i in range(len(s) - k + 1):
        (slope, _), cov = np.polyfit(s[i:i + k], v[i:i + k], 1, cov=True)
        if best is None or abs(slope) > abs(best[0]):
            best = (slope, np.sqrt(cov[0, 0]), s[i + half_window])
    slope, sigma, where = best
    return Measured(abs(slope), sigma), float(where)


def fringe_period(s_nm: ArrayLike, p0: ArrayLike) -> Measured:
    """Spatial period of Ramsey fringes on a line (sinusoid fit, start from the FFT), nm.

    Parameters
    ----------
    s_nm : array_like, shape (n,)
        Positions, nm (uniform steps, a few periods or more).
    p0 : array_like, shape (n,)
        Normalised population along the line.
    """
    s, y = np.asarray(s_nm, float), np.asarray(p0, float)
    ok = np.isfinite(y)
    s, y = s[ok], y[ok]
    if len(s) < 12:
        raise NvmriError("too few points for a fringe period")
    step = np.median(np.diff(s))
    spectrum = np.abs(np.fft.rfft(y - y.mean()))
    freqs = np.fft.rfftfreq(len(y), step)
    k0 = int(np.argmax(spectrum[1:])) + 1
    centre = s.mean()

    def model(x, a, b, k, phi, chirp):
        u = x - centre
        return a + b * np.cos(2 * np.pi * (k * u + chirp * u**2) + phi)

    p_start = [y.mean(), (y.max() - y.min()) / 2, freqs[k0], 0.0, 0.0]
    best = None
    for phi in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        try:
            popt, pcov = optimize.curve_fit(model, s, y, p0=[*p_start[:3], phi, 0.0],
                                            maxfev=5000)
        except RuntimeError:
            continue
        cost = np.sum((model(s, *popt) - y) ** 2)
        if best is None or cost < best[0]:
            best = (cost, popt, pcov)
    if best is None:
        raise NvmriError("the fringe fit did not converge")
    _, popt, pcov = best
    k, k_sigma = abs(popt[2]), np.sqrt(pcov[2, 2])
    return Measured(1.0 / k, k_sigma / k**2)


def slice_fwhm(s_nm: ArrayLike, fluorescence: ArrayLike) -> tuple[Measured, float]:
    """FWHM (nm) and centre (nm) of a CW resonant slice: a Lorentzian dip on a line."""
    fit = fit_lorentzian(np.asarray(s_nm, float), 1.0 - np.asarray(fluorescence, float))
    return Measured(fit.fwhm_hz, fit.fwhm_sigma_hz), fit.centre_hz


def gauss_per_nm(tesla_per_nm: Measured) -> Measured:
    """T/nm -> G/nm."""
    return Measured(tesla_per_nm.value * 1e4, tesla_per_nm.sigma * 1e4)


def implied_gradient(period_nm: Measured, tau_s: float) -> Measured:
    """Field gradient (G/nm) a fringe period implies with the linear Zeeman shift."""
    g = float(physics.spatial_width(tau_s, period_nm.value)) * 1e4   # symmetric formula
    return Measured(g, g * period_nm.sigma / period_nm.value)
