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

from nvmri_bluesky.reconstruct.fig2 import (
    LocalPeriods,
    SliceFit,
    fringe_gradient,
    shortest_fringe_period,
)
from nvmri_bluesky.reconstruct.layers import LayerFit
from nvmri_bluesky.reconstruct.localize import LocalizationResult

__all__ = ["quantity", "spins_report", "resolution_report", "layer_report",
           "ramsey_report", "slice_report", "gradient_report"]

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
    """A ``layers`` entry: height from the image, density from the decay if measured."""
    from nvmri_bluesky.reconstruct.evidence import DELTA_DEVIANCE_MIN, evidence

    dens = decay if decay is not None else image
    bound = "the end of the height search range" if image.at_bound else None
    return {"height_above_nv_nm": quantity(image.height_nm, image.height_sigma_nm, bound),
            "density_per_nm2": quantity(dens.density_per_nm2, dens.density_sigma_per_nm2,
                                        bound and "the height it depends on"),
            "evidence": evidence(image.delta_deviance, DELTA_DEVIANCE_MIN)}


def ramsey_report(periods: LocalPeriods, tau_s: float) -> dict[str, Any]:
    """``ramsey_fringe_period_nm`` (shortest local period) and its f+-equivalent gradient."""
    p, sp, _ = shortest_fringe_period(periods)
    g, sg = fringe_gradient(p, sp, tau_s)
    return {"ramsey_fringe_period_nm": quantity(p, sp),
            "gradient_gauss_per_nm": quantity(g, sg)}


def gradient_report(gradient_g_per_nm: np.ndarray, sigma: float | None = None) -> Quantity:
    """``gradient_gauss_per_nm`` from a true field-gradient map: the largest |value|.

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
