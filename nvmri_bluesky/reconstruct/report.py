"""report.json pieces from reconstruction results (shape of design.md).

Every quantity is ``{"value": float, "sigma": float}`` in the unit its key
names; a quantity that could not be determined (non-finite value, a sigma
that is zero or not finite, or a fit that ended on a parameter bound) is
``{"value": null, "sigma": null, "why": "..."}``: never value +/- 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr
from scipy import optimize

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct.fig2 import (
    LocalPeriods,
    SliceFit,
    fringe_gradient,
    shortest_fringe_period,
)
from nvmri_bluesky.reconstruct.layer_fits import LayerFit
from nvmri_bluesky.reconstruct.layers import layer_coupling_rate
from nvmri_bluesky.reconstruct.localize import LocalizationResult

__all__ = ["quantity", "spins_report", "resolution_report", "layer_report",
           "ramsey_report", "slice_report", "gradient_report", "fit_echo_decay",
           "snr_gain_report", "SNR_GAIN_DEFINITION"]

Quantity = dict[str, float | None]


def not_determined(why: str) -> dict[str, Any]:
    """A quantity that could not be determined, and why."""
    return {"value": None, "sigma": None, "why": why}


def quantity(value: float, sigma: float, at_bound: str | None = None) -> dict[str, Any]:
    """``{"value", "sigma"}``, or :func:`not_determined` when there is no honest sigma.

    Parameters
    ----------
    value, sigma : float
    at_bound : str, optional
        Set when the fit ended on a parameter bound: which bound.
    """
    value, sigma = float(value), float(sigma)
    if at_bound:
        return not_determined(f"the fit ended on a bound ({at_bound})")
    if not math.isfinite(value):
        return not_determined("no finite value")
    if not (math.isfinite(sigma) and sigma > 0):
        return not_determined(f"sigma is {sigma:g}: the fit did not constrain it")
    return {"value": value, "sigma": sigma}


def spins_report(result: LocalizationResult) -> list[dict[str, Any]]:
    """``spins`` entries: offsets (spin - NV, nm), couplings (Hz), evidence; strongest first."""
    from nvmri_bluesky.reconstruct.evidence import evidence
    from nvmri_bluesky.reconstruct.localize import MIN_DELTA_DEVIANCE

    out = []
    for s in result.spins:
        entry: dict[str, Any] = {}
        for k, axis in enumerate(("dx_nm", "dy_nm", "dz_nm")):
            bound = "the offset search box" if s.at_bound[k] else None
            entry[axis] = quantity(s.offset_nm[k], s.offset_sigma_nm[k], bound)
        entry["coupling_hz"] = quantity(s.coupling_hz, s.coupling_sigma_hz)
        entry["evidence"] = evidence(s.delta_deviance, MIN_DELTA_DEVIANCE)
        out.append(entry)
    return out


def resolution_report(result: LocalizationResult) -> dict[str, Quantity]:
    """``resolution_nm``: lateral and vertical slice widths at the strongest spin.

    Value and sigma are the PSF-weighted mean and spread of the slice width
    over the raster points where that spin is imaged (see localize's doc).
    """
    if not result.spins:
        nan = float("nan")
        return {"lateral": quantity(nan, nan), "vertical": quantity(nan, nan)}
    s = result.spins[0]
    return {"lateral": quantity(*s.resolution_lateral_nm),
            "vertical": quantity(*s.resolution_vertical_nm)}


def layer_report(image: LayerFit, decay: LayerFit | None = None) -> dict[str, Any]:
    """A ``layers`` entry: height from the image, density from the decay if measured.

    ``coupling_rate_hz`` (Fig. 3d's "dark-spin/NV coupling rate") is the rms
    NV-layer coupling the density and height imply (:func:`layer_coupling_rate`),
    the rate of the decay's Gaussian start.  Its sigma is half the density's
    relative sigma (nu_rms ~ sqrt(n)); the density's sigma already contains the
    height's part, so this errs on the large side.
    """
    from nvmri_bluesky.reconstruct.evidence import DELTA_DEVIANCE_MIN, evidence

    dens = decay if decay is not None else image
    n, sn = dens.density_per_nm2, dens.density_sigma_per_nm2
    rate = layer_coupling_rate(image.height_nm, n) if n > 0 else float("nan")
    bound = "the end of the height search range" if image.at_bound else None
    return {"height_above_nv_nm": quantity(image.height_nm, image.height_sigma_nm, bound),
            "density_per_nm2": quantity(n, sn, bound and "the height it depends on"),
            "coupling_rate_hz": quantity(rate, 0.5 * rate * sn / n if n > 0 else float("nan"),
                                         bound and "the height it depends on"),
            "evidence": evidence(image.delta_deviance, DELTA_DEVIANCE_MIN)}


def ramsey_report(periods: LocalPeriods, tau_s: float) -> dict[str, Any]:
    """``ramsey_fringe_period_nm`` (shortest local period) and ``gradient_gauss_per_nm``.

    The gradient is the paper's Fig. 2a number: what the period implies through
    the linear Zeeman shift, 1 / (gamma_e tau period) (the f+-equivalent gradient).
    """
    p, sp, _ = shortest_fringe_period(periods)
    g, sg = fringe_gradient(p, sp, tau_s)
    return {"ramsey_fringe_period_nm": quantity(p, sp),
            "gradient_gauss_per_nm": quantity(g, sg)}


def gradient_report(gradient_g_per_nm: np.ndarray, sigma: float | None = None) -> Quantity:
    """``field_gradient_gauss_per_nm`` from a true field-gradient map: the largest |value|.

    Parameters
    ----------
    gradient_g_per_nm : array_like
        e.g. ``field_gradient_map(...)["dbpar"]`` along the Fig. 2a linecut.
    sigma : float, optional
        Its uncertainty (default: half the spread of the 3 largest |values|,
        a discretisation estimate).
    """
    a = np.abs(np.asarray(gradient_g_per_nm, float).ravel())
    a = a[np.isfinite(a)]
    if a.size == 0:
        return quantity(float("nan"), float("nan"))
    top = np.sort(a)[-3:]
    return quantity(float(top[-1]), float(np.ptp(top) / 2) if sigma is None else sigma)


def slice_report(fit: SliceFit) -> Quantity:
    """``esr_slice_fwhm_nm``."""
    return quantity(fit.fwhm_nm, fit.fwhm_sigma_nm)


SNR_GAIN_DEFINITION = (
    "best DEER signal E(tau) (1 - cos(pi nu tau)) of the spin-1/2 over the best "
    "E(tau) (1 - sin(pi nu tau)/(pi nu tau)) of a classical moment of random orientation, "
    "each at its own free time within the measured tau range; noise: photon shot noise "
    "of the same shots (the same for both); nu from the tip-free DEER evolution, "
    "E(tau) = exp(-(tau/T2)^n) fitted to its echo gate; sigma by sampling nu, T2, n")
"""How ``snr_gain_quantum_over_classical`` is defined (also written into report.json)."""


def fit_echo_decay(ds: xr.Dataset, coord: str = "tau") -> tuple[np.ndarray, np.ndarray]:
    """(T2, n) and their covariance from the echo gate of a tip-free DEER evolution.

    E(tau) = 2 P0 - 1 with P0 normalised by the bright and dark gates, fitted
    by weighted least squares to physics.echo_coherence; weights from the
    gates' Poisson counts.

    Returns
    -------
    (theta, covariance)
        theta = (T2 in s, exponent).
    """
    tau = np.asarray(ds[coord].values, float)
    echo, bright, dark = (np.ravel(ds[g].values).astype(float) for g in ("echo", "bright", "dark"))
    coherence = 2.0 * physics.normalised_population(echo, bright, dark) - 1.0
    span = bright - dark
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = 2.0 * np.sqrt(echo + (1.0 - coherence) ** 2 / 4 * (bright + dark)) / span
    ok = np.isfinite(coherence) & np.isfinite(sigma) & (sigma > 0)

    def model(t, t2_us, n):
        return physics.echo_coherence(t, t2_us * 1e-6, n)

    popt, pcov = optimize.curve_fit(model, tau[ok], coherence[ok], p0=[20.0, 1.5],
                                    sigma=sigma[ok], absolute_sigma=True,
                                    bounds=([0.1, 0.3], [1e4, 4.0]))
    scale = np.array([1e-6, 1.0])
    return popt * scale, pcov * np.outer(scale, scale)


def snr_gain_report(evolution: xr.Dataset, nu_hz: float, nu_sigma_hz: float,
                    coord: str = "tau", samples: int = 400, seed: int = 0
                    ) -> dict[str, Any]:
    """Fig. 4a: SNR gain of the quantum single-spin DEER signal over a classical moment.

    Parameters
    ----------
    evolution : xarray.Dataset
        The tip-free DEER evolution (gates signal, echo, bright, dark along ``coord``).
    nu_hz, nu_sigma_hz : float
        The spin's coupling from that run (``fit_deer_evolution``), Hz.
    samples, seed : int
        Draws of (nu, T2, n) for the sigma.

    Returns
    -------
    dict
        ``snr_gain_quantum_over_classical`` ({"value", "sigma"}) and
        ``snr_gain_definition`` (:data:`SNR_GAIN_DEFINITION`, with the fitted T2, n).
    """
    theta, cov = fit_echo_decay(evolution, coord)
    tau = np.asarray(evolution[coord].values, float)
    window = dict(tau_min_s=float(tau.min()), tau_max_s=float(tau.max()))
    gain = physics.quantum_snr_gain(nu_hz, theta[0], theta[1], **window)
    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal(theta, cov, samples)
    nus = rng.normal(nu_hz, nu_sigma_hz, samples)
    spread = [physics.quantum_snr_gain(abs(nu), max(t2, 1e-7), max(n, 0.1), num=1501, **window)
              for nu, (t2, n) in zip(nus, draws, strict=True)]
    return {"snr_gain_quantum_over_classical": quantity(gain, float(np.std(spread))),
            "snr_gain_definition": (f"{SNR_GAIN_DEFINITION} (T2 = {theta[0] * 1e6:.2f} us, "
                                    f"n = {theta[1]:.2f}, nu = {nu_hz / 1e3:.1f} kHz, "
                                    f"tau {window['tau_min_s'] * 1e6:g}-"
                                    f"{window['tau_max_s'] * 1e6:g} us)")}
