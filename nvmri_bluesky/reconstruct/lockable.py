"""Where a locked raster's lock can follow the measured NV line (protocol design).

A locked raster predicts each point's line frequency by linear extrapolation
along its step (:class:`~nvmri_bluesky.plans.lock.Predictor`); its miss is the
line's second difference over one step.  From a measured ``psf_map``
(:func:`line_shift_map`) these give the largest miss on a raster plane
(:func:`raster_miss_hz`) and the lowest apex height at which the lock can
follow a raster (:func:`lowest_lockable_apex_nm`), with margin
:data:`LOCKABLE_FRACTION` of the lock's reach.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from numpy.typing import NDArray

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant

__all__ = ["LOCKABLE_FRACTION", "line_shift_map", "lowest_lockable_apex_nm", "raster_miss_hz"]


LOCKABLE_FRACTION = 0.5
"""A raster is designed so that its lock's prediction misses stay within this fraction of
the lock's reach (:data:`~nvmri_bluesky.plans.lock.LOCK_REACH_HZ`): margin for the map's
interpolation and the apex drift."""


def line_shift_map(psf: xr.Dataset) -> DetuningInterpolant:
    """The measured shift of the locked NV line (ms=0->+1), f+(tip) - f+(retracted), Hz.

    Parameters
    ----------
    psf : xarray.Dataset
        A ``psf_map`` run (``lock_frequency`` on x, y, z; ``f_nv0_hz`` in attrs).

    Returns
    -------
    DetuningInterpolant
        Over the map's complete planes.
    """
    return DetuningInterpolant.from_map(psf["lock_frequency"] - float(psf.attrs["f_nv0_hz"]))


def lowest_lockable_apex_nm(line_map: DetuningInterpolant, x: tuple[float, float, int],
                            y: tuple[float, float, int], reach_hz: float | None = None,
                            dz_nm: float = 0.5) -> float:
    """Lowest apex height at which a locked raster's lock can follow the line, nm.

    A locked raster predicts each point's line frequency by linear
    extrapolation along its step (:class:`~nvmri_bluesky.plans.lock.Predictor`);
    its miss is the line's second difference over one step.  This is that
    miss, on the raster's lateral grid (x, y) at heights from the map's top
    down in ``dz_nm`` steps, from the *measured* map: the lowest height down
    to which it stays within ``reach_hz`` on every plane in between.  Never
    below the map's lowest plane (below it the line is not known).

    Parameters
    ----------
    line_map : DetuningInterpolant
        The locked line's measured shift map (:func:`line_shift_map`), Hz.
    x, y : (start, stop, num)
        The raster's lateral axes, nm (the step is the predictor's step).
    reach_hz : float, optional
        Largest miss allowed, Hz; default :data:`LOCKABLE_FRACTION` of the
        lock's reach.
    dz_nm : float
        Height resolution of the answer, nm.

    Returns
    -------
    float
        Apex height, nm.

    Raises
    ------
    NvmriError
        If the lock could not follow even at the map's top.
    """
    from nvmri_bluesky.plans.lock import LOCK_REACH_HZ

    reach = LOCKABLE_FRACTION * LOCK_REACH_HZ if reach_hz is None else float(reach_hz)
    xs, ys = np.linspace(*x), np.linspace(*y)
    z_lo, z_hi = line_map.bounds[2]
    lowest = None
    for z in np.arange(z_hi, z_lo - 1e-9, -dz_nm):
        if raster_miss_hz(line_map, xs, ys, float(z)) > reach:
            break
        lowest = float(z)
    if lowest is None:
        raise NvmriError(f"the lock cannot follow the line over this raster even at apex "
                         f"{z_hi:g} nm (prediction misses above {reach / 1e6:.0f} MHz)")
    return lowest


def raster_miss_hz(line_map: DetuningInterpolant, xs: NDArray, ys: NDArray, z_nm: float
                   ) -> float:
    """Largest linear-extrapolation miss (second difference) along x and y on a plane, Hz.

    Raises :class:`NvmriError` if the plane leaves the map.
    """
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    f = line_map(np.stack([gx, gy, np.full_like(gx, z_nm)], -1))
    if not np.isfinite(f).all():
        raise NvmriError(f"the raster (x {xs[0]:g}..{xs[-1]:g}, y {ys[0]:g}..{ys[-1]:g} nm at "
                         f"apex {z_nm:g} nm) leaves the measured map")
    misses = [np.abs(np.diff(f, 2, axis=a)).max() for a in (0, 1) if f.shape[a] > 2]
    return float(max(misses, default=0.0))
