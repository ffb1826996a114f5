"""The magnetic tip's geometry: its field and field gradient, axes, the drifting apex.

Frame: the diamond surface is z = 0, diamond below; the tip is a uniformly
magnetised sphere whose centre sits ``radius`` above the apex.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.physics.constants import MU0_OVER_4PI

__all__ = [
    "axis_from_angles", "tip_field", "tip_gradient", "apex_with_drift",
]

def axis_from_angles(polar_deg: float, azimuth_deg: float) -> NDArray:
    """Unit vector from a polar angle (from +z) and an azimuth, degrees -> (3,)."""
    th, ph = np.deg2rad(polar_deg), np.deg2rad(azimuth_deg)
    return np.array([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)])


def _tip_offset_m(points_nm: ArrayLike, apex_nm: ArrayLike, radius_nm: float) -> NDArray:
    centre = np.asarray(apex_nm, float) + np.array([0.0, 0.0, radius_nm])
    return (np.asarray(points_nm, float) - centre) * 1e-9


def tip_field(points_nm: ArrayLike, apex_nm: ArrayLike, radius_nm: float = 30.0,
              moment_am2: float = 4.3e-17) -> NDArray:
    """Field of the magnetised-sphere tip (moment along +z), outside the sphere.

    Parameters
    ----------
    points_nm : array_like, shape (..., 3)
        Where the field is wanted, nm.
    apex_nm : array_like, shape (..., 3)
        Tip apex positions, nm; broadcast against ``points_nm``.
    radius_nm : float
        Sphere radius; its centre is ``radius_nm`` above the apex.
    moment_am2 : float
        Magnetic moment, A m^2.

    Returns
    -------
    ndarray, shape (..., 3)
        Point-dipole field B = 1e-7 (3 r^(m.r^) - m) / |r|^3, T.
    """
    r = _tip_offset_m(points_nm, apex_nm, radius_nm)
    r2 = np.einsum("...i,...i->...", r, r)
    k = MU0_OVER_4PI * moment_am2 / (r2 * np.sqrt(r2))          # mu0 m / (4 pi r^3)
    b = (3.0 * k * r[..., 2] / r2)[..., None] * r               # 3 r (m . r) / r^2 term
    b[..., 2] -= k
    return b


def tip_gradient(points_nm: ArrayLike, apex_nm: ArrayLike, axis: ArrayLike,
                 radius_nm: float = 30.0, moment_am2: float = 4.3e-17) -> NDArray:
    """Gradient of the tip field's component along ``axis``, d(B_tip . n)/dr.

    The gradient with respect to the tip position is the negative of this;
    magnitudes (what resolution depends on) are the same.

    Returns
    -------
    ndarray, shape (..., 3)
        T/nm.
    """
    r = _tip_offset_m(points_nm, apex_nm, radius_nm)
    n = np.asarray(axis, float)
    m = np.array([0.0, 0.0, moment_am2])
    rn = np.linalg.norm(r, axis=-1, keepdims=True)
    mr, nr, mn = (r @ m)[..., None], (r @ n)[..., None], float(m @ n)
    grad = 3 * (m * nr + n * mr + mn * r) / rn**5 - 15 * mr * nr * r / rn**7
    return MU0_OVER_4PI * grad * 1e-9


def apex_with_drift(stage_nm: ArrayLike, drift_nm_per_s: ArrayLike, time_s: ArrayLike
                    ) -> NDArray:
    """True tip apex: stage readback plus a linear drift, stage + v t, nm. Shape (..., 3)."""
    return (np.asarray(stage_nm, float)
            + np.asarray(drift_nm_per_s, float) * np.asarray(time_s, float)[..., None])
