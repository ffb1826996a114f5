"""report.json pieces from reconstruction results (shape of design.md).

Every quantity is ``{"value": float, "sigma": float}`` in the unit its key
names; a quantity that could not be determined has ``null`` value and sigma
(JSON has no NaN).
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


def quantity(value: float, sigma: float) -> Quantity:
    """``{"value", "sigma"}`` with non-finite numbers as None."""
    def clean(v: float) -> float | None:
        v = float(v)
        return v if math.isfinite(v) else None

    return {"value": clean(value), "sigma": clean(sigma)}


def spins_report(result: LocalizationResult) -> list[dict[str, Quantity]]:
    """``spins`` entries: offsets (spin - NV, nm) and couplings (Hz), strongest first."""
    out = []
    for s in result.spins:
        out.append({"dx_nm": quantity(s.offset_nm[0], s.offset_sigma_nm[0]),
                    "dy_nm": quantity(s.offset_nm[1], s.offset_sigma_nm[1]),
                    "dz_nm": quantity(s.offset_nm[2], s.offset_sigma_nm[2]),
                    "coupling_hz": quantity(s.coupling_hz, s.coupling_sigma_hz)})
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


def layer_report(image: LayerFit, decay: LayerFit | None = None) -> dict[str, Quantity]:
    """A ``layers`` entry: height from the image, density from the decay if measured."""
    dens = decay if decay is not None else image
    return {"height_above_nv_nm": quantity(image.height_nm, image.height_sigma_nm),
            "density_per_nm2": quantity(dens.density_per_nm2, dens.density_sigma_per_nm2)}


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
