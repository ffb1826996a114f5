"""The Fig. 2 calibration's design (numbers and designers): where its lines go.

Like :mod:`.protocol` for the samples, everything here is a pure function of
*measured* data (the two-transition lock lines), so the ``calibration`` plan
(:func:`nvmri_bluesky.plans.protocol.calibration`) calls it between runs:

1. a lock line (:func:`lock_line`) along y at :data:`RAMSEY_HEIGHT_NM`;
2. the Ramsey line across where f+ is steepest on it (:func:`design_ramsey_line`);
3. a lock line along x at :data:`CW_HEIGHT_NM`;
4. the CW slice across where its f+-equivalent gradient is
   :data:`CW_GRADIENT_GAUSS_PER_NM` (:func:`design_cw_slice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct.fig2 import field_gradient_map, gradient_crossing

RAMSEY_HEIGHT_NM = 30.0
"""Apex height of the gradient and Ramsey lines, nm."""
RAMSEY_TAU_S = 450e-9
"""Ramsey free time, s."""
CW_HEIGHT_NM = 10.0
"""Apex height of the CW gradient line and the CW slice, nm."""
CW_GRADIENT_GAUSS_PER_NM = 12.0
"""f+-equivalent gradient at which the CW slice is measured (the paper's
linear-Zeeman 12 G/nm), G/nm."""
LINE_HALF_NM = 60.0
"""Half-length of the lock lines, nm."""
SHOTS = 300_000
"""Shots per point of every calibration line."""
RAMSEY_PERIODS = 8
"""The Ramsey line reaches this many (expected) fringe periods either side."""
RAMSEY_POINTS_PER_PERIOD = 10
CW_SLICE_WIDTHS = 8
"""The CW slice line reaches this many slice widths either side."""
CW_SLICE_POINTS = 161


@dataclass(frozen=True)
class LineDesign:
    """One calibration line across a point of a lock line.

    Attributes
    ----------
    axis : (float, float, int)
        Start, stop (nm) and number of points along the line.
    centre_nm : float
        The point it crosses, nm.
    mw_frequency_hz : float
        f+ locked there (where the line's run looks first), Hz.
    gradient_gauss_per_nm : float or None
        |dB_par/ds| there (exact, both transitions), G/nm (the CW slice's).
    """

    axis: tuple[float, float, int]
    centre_nm: float
    mw_frequency_hz: float
    gradient_gauss_per_nm: float | None = None


def lock_line(half_nm: float = LINE_HALF_NM) -> tuple[float, float, int]:
    """A lock line's axis: -half .. +half in ``int(half) + 1`` points (2 nm steps), nm."""
    return (-half_nm, half_nm, int(half_nm) + 1)


def design_ramsey_line(line: xr.Dataset, tau_s: float = RAMSEY_TAU_S) -> LineDesign:
    """The Ramsey line across the point of a lock line along y where f+ is steepest.

    The fringes follow f+ (physics.md Fig. 2a): their expected period there is
    :func:`~nvmri_bluesky.physics.spatial_width` of the f+-equivalent gradient
    (at least 1 Hz/nm); the line reaches :data:`RAMSEY_PERIODS` periods either
    side in steps of 1/:data:`RAMSEY_POINTS_PER_PERIOD` period (at least
    +/- 1 nm).

    Parameters
    ----------
    line : Dataset
        The lock line along y (``psf_map`` data: ``y``, ``lock_frequency``).
    tau_s : float
        Ramsey free time, s.
    """
    y = line["y"].values
    f_plus = line["lock_frequency"].values.ravel()
    grads = field_gradient_map(line, along="y")
    equiv = grads["dfplus_equiv"].values.ravel()
    i_peak = int(np.nanargmax(np.abs(equiv[1:-1]))) + 1
    y_peak = float(y[i_peak])
    gradient_t_per_nm = max(abs(float(equiv[i_peak])) * 1e-4, 1.0 / physics.GAMMA_E)
    period = float(physics.spatial_width(tau_s, gradient_t_per_nm))
    half = max(RAMSEY_PERIODS * period, 1.0)
    step = period / RAMSEY_POINTS_PER_PERIOD
    y_lo = round(y_peak - half, 3)
    return LineDesign(axis=(y_lo, round(y_lo + 2 * half, 3), int(round(2 * half / step)) + 1),
                      centre_nm=y_peak, mw_frequency_hz=float(f_plus[i_peak]))


def design_cw_slice(line: xr.Dataset,
                    gradient_gauss_per_nm: float = CW_GRADIENT_GAUSS_PER_NM) -> LineDesign:
    """The CW slice line across the point of a lock line along x where the slice
    measures ``gradient_gauss_per_nm`` (``fig2.gradient_crossing``).

    The line reaches :data:`CW_SLICE_WIDTHS` slice widths
    (:func:`~nvmri_bluesky.physics.spatial_width` at
    :data:`~nvmri_bluesky.physics.TAU_CW_S`) either side, in
    :data:`CW_SLICE_POINTS` points.

    Parameters
    ----------
    line : Dataset
        The lock line along x (``psf_map`` data: ``x``, ``lock_frequency``).
    gradient_gauss_per_nm : float
        The f+-equivalent gradient to find, G/nm.
    """
    x = line["x"].values
    f_plus = line["lock_frequency"].values.ravel()
    grads = field_gradient_map(line, along="x")
    grad = np.abs(grads["dbpar"].values.ravel())
    x_c = gradient_crossing(x, grads["dfplus_equiv"].values.ravel(), grad,
                            gradient_gauss_per_nm)
    i = int(np.argmin(np.abs(x - x_c)))
    width = float(physics.spatial_width(physics.TAU_CW_S, gradient_gauss_per_nm * 1e-4))
    x_lo = round(x_c - CW_SLICE_WIDTHS * width, 4)
    return LineDesign(axis=(x_lo, round(x_c + CW_SLICE_WIDTHS * width, 4), CW_SLICE_POINTS),
                      centre_nm=float(x_c), mw_frequency_hz=float(np.interp(x_c, x, f_plus)),
                      gradient_gauss_per_nm=float(grad[i]))
