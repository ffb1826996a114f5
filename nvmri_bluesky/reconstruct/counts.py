"""Per-point DEER contrast from the four gates' photon counts, with propagated noise.

The reconstruction's input for rasters is an ``xarray.Dataset`` on the tip grid
(coords ``x``, ``y``, ``z`` in nm; ``z`` the apex height above the surface)
with the raw counts ``signal``, ``echo``, ``bright``, ``dark`` per point and
``attrs["shots"]`` (see ``docs/reconstruction.md``).  Sweeps (tip retracted)
use the same variables on a ``rf_frequency`` (Hz) or ``tau`` (s) coordinate.

Contrast (physics.md): P0 = (gate - dark)/(bright - dark), S = 2 P0 - 1 for
the RF-on gate, E likewise for the echo gate, c = (E - S)/E, i.e.
``physics.deer_contrast``.  In counts that is c = 2 (e - s) / (2 e - b - d),
whose variance follows from independent Poisson counts by the delta method.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError

__all__ = ["GATES", "contrast_with_sigma", "deer_contrast_dataset", "check_gates",
           "valid_points"]

GATES = ("signal", "echo", "bright", "dark")
"""Gate variables every DEER dataset carries (photon counts)."""


def check_gates(ds: xr.Dataset, gates: tuple[str, ...] = GATES) -> None:
    """Raise a one-line :class:`NvmriError` if a gate variable is missing."""
    missing = [g for g in gates if g not in ds.data_vars]
    if missing:
        raise NvmriError(f"dataset lacks the count variables {missing} "
                         f"(has {sorted(map(str, ds.data_vars))})")


def contrast_with_sigma(signal: ArrayLike, echo: ArrayLike, bright: ArrayLike,
                        dark: ArrayLike) -> tuple[NDArray, NDArray]:
    """DEER contrast c = (E - S)/E and its standard deviation from Poisson counts.

    Parameters
    ----------
    signal, echo, bright, dark : array_like, same shape
        Photon counts of the RF-on, RF-off, ms=0 and ms=1 reference gates.

    Returns
    -------
    (c, sigma) : ndarrays, same shape
        ``physics.deer_contrast`` and sqrt(sum_k (dc/dn_k)^2 n_k) (counts
        floored at 1 so that zero counts do not give zero variance); NaN where
        the echo coherence is not positive.
    """
    s, e, b, d = (np.asarray(a, float) for a in (signal, echo, bright, dark))
    c = physics.deer_contrast(s, e, b, d)
    den = 2.0 * e - b - d
    with np.errstate(invalid="ignore", divide="ignore"):
        num = 2.0 * (e - s)
        dc_ds = -2.0 / den
        dc_de = 2.0 / den - 2.0 * num / den**2
        dc_db = num / den**2
        dc_dd = num / den**2
        var = (dc_ds**2 * np.maximum(s, 1.0) + dc_de**2 * np.maximum(e, 1.0)
               + dc_db**2 * np.maximum(b, 1.0) + dc_dd**2 * np.maximum(d, 1.0))
        bad = ~(den > 0)
    return np.where(bad, np.nan, c), np.where(bad, np.nan, np.sqrt(var))


def valid_points(ds: xr.Dataset) -> xr.DataArray:
    """Boolean mask of points whose four gates are finite and not all zero (dropouts)."""
    check_gates(ds)
    finite = np.isfinite(ds["signal"]) & np.isfinite(ds["echo"]) & np.isfinite(
        ds["bright"]) & np.isfinite(ds["dark"])
    nonzero = (ds["signal"] + ds["echo"] + ds["bright"] + ds["dark"]) > 0
    return finite & nonzero & (ds["bright"] > ds["dark"])


def deer_contrast_dataset(ds: xr.Dataset) -> xr.Dataset:
    """``contrast`` and ``contrast_sigma`` variables on the dataset's grid.

    Parameters
    ----------
    ds : xarray.Dataset
        Counts ``signal``, ``echo``, ``bright``, ``dark`` on any coordinates.

    Returns
    -------
    xarray.Dataset
        ``contrast`` (dimensionless) and ``contrast_sigma``, NaN at invalid points.
    """
    check_gates(ds)
    c, s = contrast_with_sigma(ds["signal"].values, ds["echo"].values, ds["bright"].values,
                               ds["dark"].values)
    ok = valid_points(ds).values
    c, s = np.where(ok, c, np.nan), np.where(ok, s, np.nan)
    dims = ds["signal"].dims
    out = xr.Dataset({"contrast": (dims, c), "contrast_sigma": (dims, s)},
                     coords=ds["signal"].coords, attrs=dict(ds.attrs))
    out["contrast"].attrs["units"] = ""
    out["contrast_sigma"].attrs["units"] = ""
    return out
