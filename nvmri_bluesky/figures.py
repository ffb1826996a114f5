"""Report figures: what a physicist would put on a slide (PNG, headless).

* Fig. 2: the field along the NV axis on the y-linecut with its gradient, the
  Ramsey fringes there, and the CW-ESR resonant slice, each with its fit.
* Fig. 3: DEER contrast maps of a layer, one panel per plane.
* Fig. 4: the DEER contrast map of the single-spin raster and orthogonal cuts
  at the fitted spin (marked) through the fine-voxel deconvolution of all the
  class's rasters (``reconstruct.density.fine_density``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct.counts import deer_contrast_dataset
from nvmri_bluesky.reconstruct.fig2 import (
    cw_slice_fwhm,
    field_gradient_map,
    fringe_gradient,
    ramsey_local_periods,
    shortest_fringe_period,
)
from nvmri_bluesky.reconstruct.runs import load_run


def scale_bar(ax: Axes, length_nm: float, label: str | None = None) -> None:
    """A white scale bar in the lower-left corner of an image axes (data units nm)."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    x, y = x0 + 0.06 * (x1 - x0), y0 + 0.07 * (y1 - y0)
    ax.plot([x, x + length_nm], [y, y], color="white", lw=3, solid_capstyle="butt")
    ax.text(x + length_nm / 2, y + 0.03 * (y1 - y0), label or f"{length_nm:g} nm",
            color="white", ha="center", va="bottom", fontsize=8, fontweight="bold")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def calibration(cat: Any, uids: dict[str, str], path: Path) -> Path:
    """Fig. 2: gradient line, Ramsey fringes and CW slice."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    line = load_run(cat, uids["gradient_line"])
    y = line["y"].values
    grads = field_gradient_map(line, along="y")
    ax1.plot(y, grads["dbpar"].values.ravel(), "k-", lw=1.2,
             label="exact dB_par/dy, both transitions\n(field_gradient_gauss_per_nm)")
    ax1.plot(y, grads["dfplus_equiv"].values.ravel(), "C0--", lw=1,
             label="(df+/dy)/gamma, linear Zeeman: what the\nfringes give (gradient_gauss_per_nm)")
    ax1.set_xlabel("tip y (nm), x = 0, apex 30 nm")
    ax1.set_ylabel("gradient (G/nm)")
    ax1.legend(fontsize=7)
    ax1.set_title("tip field gradient along the NV axis")

    ramsey = load_run(cat, uids["ramsey_line"])
    p0 = np.ravel(physics.normalised_population(ramsey["ramsey"].values,
                                                ramsey["bright"].values, ramsey["dark"].values))
    period, sigma, _ = shortest_fringe_period(ramsey_local_periods(ramsey["y"].values, p0))
    grad, grad_sigma = fringe_gradient(period, sigma, float(ramsey.attrs["tau_s"]))
    ax2.plot(ramsey["y"].values, p0, ".-", ms=3, lw=0.6)
    ax2.set_xlabel("tip y (nm)")
    ax2.set_ylabel("Ramsey P0")
    ax2.set_title(f"Fig. 2a fringes: period {10 * period:.2f} +/- {10 * sigma:.2f} A\n"
                  f"-> {grad:.2f} +/- {grad_sigma:.2f} G/nm (linear Zeeman)", fontsize=10)

    cw = load_run(cat, uids["cw_slice"])
    x = cw["x"].values
    ratio = np.ravel(cw["cw_0"].values / cw["cw_1"].values)
    fit = cw_slice_fwhm(x, np.ravel(cw["cw_0"].values), reference=np.ravel(cw["cw_1"].values))
    ax3.plot(x - fit.centre_nm, ratio, ".", ms=3)
    ax3.set_xlabel("tip x - slice centre (nm), apex 10 nm")
    ax3.set_ylabel("CW fluorescence I/I0")
    ax3.set_title(f"Fig. 2b slice: FWHM {10 * fit.fwhm_nm:.2f} +/- {10 * fit.fwhm_sigma_nm:.2f} A")
    return _save(fig, path)


def _contrast(deer: xr.Dataset) -> xr.DataArray:
    return deer_contrast_dataset(deer)["contrast"]


def layer(deer: xr.Dataset, path: Path, fit: Any | None = None) -> Path:
    """Fig. 3: DEER contrast per plane of a layer raster."""
    c = _contrast(deer)
    planes = c["z"].values
    fig = Figure(figsize=(4.2 * len(planes) + 0.8, 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(planes)))
    x, y = c["x"].values, c["y"].values
    for ax, z in zip(axes, planes, strict=True):
        im = ax.imshow(c.sel(z=z).transpose("y", "x").values, origin="lower", cmap="magma",
                       extent=(x[0], x[-1], y[0], y[-1]))
        ax.set_title(f"apex {z:.0f} nm")
        ax.set_xlabel("x (nm)")
        ax.set_ylabel("y (nm)")
        scale_bar(ax, 10.0)
    fig.colorbar(im, ax=axes.tolist(), label="DEER contrast")
    if fit is not None:
        fig.suptitle(f"layer {fit.height_nm:.2f} +/- {fit.height_sigma_nm:.2f} nm above the NV")
    return _save(fig, path)


def _image(fig: Figure, ax: Axes, values: np.ndarray, h: np.ndarray, v: np.ndarray,
           cmap: str, label: str, bar_nm: float) -> None:
    """One image panel (pixel centres h, v in nm) with its colour bar and a scale bar."""
    dh = (h[-1] - h[0]) / max(h.size - 1, 1) / 2
    dv = (v[-1] - v[0]) / max(v.size - 1, 1) / 2
    im = ax.imshow(values, origin="lower", cmap=cmap, aspect="equal",
                   extent=(h[0] - dh, h[-1] + dh, v[0] - dv, v[-1] + dv))
    fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    scale_bar(ax, bar_nm)


def _zoom_panel(fig: Figure, ax: Axes, zoom: xr.Dataset) -> None:
    c = _contrast(zoom)
    x, y = c["x"].values, c["y"].values
    _image(fig, ax, c.isel(z=0).transpose("y", "x").values, x, y, "magma", "DEER contrast",
           1.0)
    ax.set_title(f"zoom across the ring, apex {float(c['z'][0]):.1f} nm\n"
                 f"({x[1] - x[0]:.2g} nm steps)", fontsize=9)
    ax.set_xlabel("tip x (nm)")
    ax.set_ylabel("tip y (nm)")


def spins(deer: xr.Dataset, result: Any, path: Path, zoom: xr.Dataset | None = None,
          fine: xr.DataArray | None = None) -> Path:
    """Fig. 4: contrast map, cuts of the deconvolved map at the spin, the zoom raster.

    Every image has a colour bar and a scale bar.  ``fine``: the fine-voxel
    density around the spin (``reconstruct.density.fine_density``); without
    it the localisation's coarse one (``result.density``, the raster's step).
    """
    c = _contrast(deer)
    panels = 4 if zoom is None else 5
    fig = Figure(figsize=(3.6 * panels, 3.9), layout="constrained")
    axes = fig.subplots(1, panels)
    x, y = c["x"].values, c["y"].values
    _image(fig, axes[0], c.isel(z=0).transpose("y", "x").values, x, y, "magma",
           "DEER contrast", 10.0)
    axes[0].set_title(f"DEER contrast, apex {float(c['z'][0]):.0f} nm", fontsize=9)
    axes[0].set_xlabel("tip x (nm)")
    axes[0].set_ylabel("tip y (nm)")
    density = result.density if fine is None else fine
    bar = 2.0 if fine is None else 1.0
    unit = ("w per voxel" if fine is None
            else f"w per ({float(fine.attrs['step_nm']):.2g} nm)$^3$ voxel")
    spin = result.spins[0].offset_nm if result.spins else np.zeros(3)
    cuts = (("x", "y", "z"), ("x", "z", "y"), ("y", "z", "x"))
    for ax, (h, v, fixed) in zip(axes[1:4], cuts, strict=True):
        k = "xyz".index(fixed)
        plane = density.sel({f"d{fixed}": spin[k]}, method="nearest").transpose(f"d{v}", f"d{h}")
        hx, vx = plane[f"d{h}"].values, plane[f"d{v}"].values
        _image(fig, ax, plane.values, hx, vx, "viridis", unit, bar)
        if fine is None:
            ax.set_aspect("auto")
            ax.plot(0, 0, "wx", ms=8, mew=2) if (h, v) == ("x", "y") else None
        if result.spins:
            ax.plot(spin["xyz".index(h)], spin["xyz".index(v)], "r+", ms=10, mew=1)
        ax.set_xlabel(f"d{h} (nm)")
        ax.set_ylabel(f"d{v} (nm)")
        ax.set_title(f"deconvolved, d{fixed} = {spin[k]:.2f} nm", fontsize=9)
    if zoom is not None:
        _zoom_panel(fig, axes[4], zoom)
    if result.spins:
        s = result.spins[0]
        fig.suptitle("spin - NV = (" + ", ".join(
            f"{v:.2f} +/- {e:.2f}" for v, e in zip(s.offset_nm, s.offset_sigma_nm, strict=True))
            + f") nm;  resolution lateral {s.resolution_lateral_nm[0]:.2f}, "
              f"vertical {s.resolution_vertical_nm[0]:.2f} nm")
    else:
        fig.suptitle("no point spin located: the survey's deconvolved density on its own "
                     "raster step (what the search saw)")
    return _save(fig, path)


def adaptive_points(survey: xr.Dataset, points: xr.Dataset, result: Any, detuning: Any,
                    line: Any, path: Path) -> Path:
    """Where the adaptive protocol measured: its points over the survey and the spin's ring.

    Left: the survey's DEER contrast with every adaptive point (colour: its
    batch order, area: its shots) and, in white, the fitted spin's resonant
    ring on each plane measured (PSF at half its peak, from the measured map).
    Right: the same points' contrast against their predicted PSF.
    """
    from nvmri_bluesky.reconstruct.psf import DarkSpinPSF

    c = _contrast(survey)
    fig = Figure(figsize=(11.0, 4.4), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    x, y = c["x"].values, c["y"].values
    # a single spin's contrast is w PSF in [0, 2]: few-shot outliers would hide the ring
    _image(fig, ax, np.clip(c.isel(z=0).transpose("y", "x").values, -0.5, 2.5), x, y, "magma",
           "DEER contrast (clipped to -0.5..2.5)", 10.0)
    px, py, pz = (np.asarray(points[a].values, float) for a in ("x", "y", "z"))
    shots = np.asarray(points["shots"].values, float) if "shots" in points else np.ones(px.size)
    order = np.arange(px.size)
    sc = ax.scatter(px, py, c=order, s=30 * shots / shots.max(), cmap="cool",
                    edgecolors="k", linewidths=0.4)
    fig.colorbar(sc, ax=ax, shrink=0.8, label="point (order measured)")
    psf = DarkSpinPSF(detuning, line, float(points.attrs["rf_frequency_hz"]))
    if result.spins:
        spin = result.spins[0].offset_nm
        gx, gy = np.meshgrid(np.linspace(x[0], x[-1], 300), np.linspace(y[0], y[-1], 300))
        for z, style in zip(sorted(set(np.round(pz, 3))), ("-", "--", ":", "-."), strict=False):
            tips = np.stack([gx, gy, np.full_like(gx, z)], -1)
            v = np.nan_to_num(psf(tips - spin))
            ax.contour(gx, gy, v, levels=[0.5 * line.peak], colors="w", linewidths=0.8,
                       linestyles=style)
        s = result.spins[0]
        ax.set_title("adaptive points on the survey; white: fitted ring (PSF = peak/2)\n"
                     "spin - NV = (" + ", ".join(f"{a:.2f}+/-{e:.2f}" for a, e in zip(
                         s.offset_nm, s.offset_sigma_nm, strict=True)) + ") nm", fontsize=8)
        pred = np.nan_to_num(psf(np.stack([px, py, pz], -1) - spin)) / line.peak
        con = deer_contrast_dataset(points)
        ax2.errorbar(pred, con["contrast"].values, yerr=con["contrast_sigma"].values, fmt="o",
                     ms=3, lw=0.6)
        ax2.set_xlabel("predicted PSF / peak at the fitted spin")
        ax2.set_ylabel("measured DEER contrast")
        ax2.set_title(f"{px.size} points, {int(shots.sum()):,} shots", fontsize=9)
    ax.set_xlabel("tip x (nm)")
    ax.set_ylabel("tip y (nm)")
    return _save(fig, path)
