"""Live resonant slices: raster images filling in point by point, one per z-plane.

Rows are quantities (DEER contrast and NV detuning for a DEER raster; the two
transitions for a PSF map; the normalised signal for Ramsey and CW-ESR
rasters), columns are the z-planes of the grid, finished planes kept side by
side.  A grid with one lateral row (a line along x or y: the Fig. 2 Ramsey
and CW lines, the lock lines) is drawn as line plots, one curve per plane.
Works in an interactive matplotlib session (redraws as events arrive)
and headless (writes a PNG when the run stops, or on :meth:`save`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
from bluesky.callbacks.core import CallbackBase
from matplotlib.figure import Figure

from nvmri_bluesky import physics

Quantity = tuple[str, str, Callable[[dict], float]]
"""(title with unit, colormap, event data -> value)."""


def _gate_index(start: dict) -> dict[str, int]:
    programs = list(start.get("programs", {}).values())
    if not programs:
        return {}
    return {g["name"]: i for i, g in enumerate(programs[0]["gates"])}


def _detuning(key: str, ref: float | None) -> Callable[[dict], float]:
    state = {"ref": ref}

    def value(data: dict) -> float:
        f = data.get(key, np.nan)
        if state["ref"] is None and np.isfinite(f):
            state["ref"] = f
        return (f - state["ref"]) / 1e6

    return value


def quantities(start: dict) -> list[Quantity]:
    """What to image for a run, chosen from its start document."""
    plan = start.get("plan_name", "")
    gate = _gate_index(start)
    ref = start.get("f_nv0_hz")

    def counts(data: dict, name: str) -> float:
        return float(np.asarray(data["counter_counts"])[gate[name]])

    if plan == "deer_raster":
        return [("DEER contrast", "magma", lambda d: d.get("deer_contrast", np.nan)),
                ("NV detuning (MHz)", "viridis", _detuning("lock_frequency", ref))]
    if plan == "psf_map":
        return [("ms=0->+1 detuning (MHz)", "viridis", _detuning("lock_frequency", ref)),
                ("ms=0->-1 shift (MHz)", "cividis",
                 _detuning("lock_minus_frequency", start.get("f_minus0_hz")))]
    if plan == "ramsey_raster":
        return [("Ramsey P0", "RdBu_r", lambda d: float(physics.normalised_population(
            counts(d, "ramsey"), counts(d, "bright"), counts(d, "dark"))))]
    if plan == "esr_raster":
        return [("CW fluorescence I/I0", "gray", lambda d: counts(d, "cw_0") / counts(d, "cw_1"))]
    return []


SWEEPS = {"odmr_sweep": ("mw_frequency", "MW frequency (GHz)", 1e-9)}
"""Plans without a grid drawn as a spectrum: plan -> (data key, axis label, scale)."""


def _sweep_axis(start: dict) -> tuple[str, str, float] | None:
    return None if start.get("grid") else SWEEPS.get(start.get("plan_name", ""))


def sweep_quantities(start: dict) -> list[Quantity]:
    """What to plot against the swept value of a plan in :data:`SWEEPS`."""
    gate = _gate_index(start)
    if start.get("plan_name") == "odmr_sweep" and {"cw_0", "cw_1"} <= set(gate):
        def ratio(d: dict) -> float:
            c = np.asarray(d["counter_counts"], float)
            return float(c[gate["cw_0"]] / c[gate["cw_1"]])

        return [("CW fluorescence I/I0", "", ratio)]
    return []


def _fixed_margins(size: tuple[float, float], nrow: int, ncol: int) -> dict[str, float]:
    """Subplot margins (figure fractions) of a ``nrow`` x ``ncol`` image grid of
    ``size`` (inches) with a colour bar per row: room for the y labels, the
    titles and the x labels, as a constrained layout would leave."""
    width, height = size
    left, right, bottom, top, wgap, hgap = 0.85, 1.0, 0.45, 0.5, 0.45, 0.75      # inches
    cell_w = (width - left - right - wgap * (ncol - 1)) / ncol
    cell_h = (height - bottom - top - hgap * (nrow - 1)) / nrow
    return dict(left=left / width, right=1 - right / width, bottom=bottom / height,
                top=1 - top / height, wspace=wgap / cell_w, hspace=hgap / cell_h)


class LiveSlices(CallbackBase):
    """Images of a raster's quantities per z-plane, filled in as events arrive.

    Parameters
    ----------
    out_dir : path, optional
        Where to write ``<plan>_<uid8>.png`` when a run stops.
    redraw_interval_s : float
        Least time between redraws of an interactive figure, s.
    max_planes : int
        Most z-planes shown (evenly chosen when the grid has more).
    """

    def __init__(self, out_dir: str | Path | None = None, redraw_interval_s: float = 0.3,
                 max_planes: int = 8) -> None:
        super().__init__()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.redraw_interval_s = redraw_interval_s
        self.max_planes = max_planes
        self.figure: Figure | None = None
        self.saved: list[Path] = []
        self._active = False

    # -- documents -------------------------------------------------------
    def start(self, doc: dict) -> None:
        grid = doc.get("grid")
        self._sweep = _sweep_axis(doc)
        if self._sweep is not None:
            self._start_sweep(doc)
            return
        self._q = quantities(doc)
        self._active = bool(grid) and bool(self._q)
        if not self._active:
            return
        self._start = doc
        self._shape = [int(n) for n in grid["shape"]]        # (z, y, x)
        self._extents = np.asarray(grid["extents"], float)
        self._axes = [a.split("_")[-1] for a in grid["axes"]]  # 'z', 'y', 'x'
        self._data = np.full((len(self._q), *self._shape), np.nan)
        nz = self._shape[0]
        self._planes = np.unique(np.linspace(0, nz - 1, min(nz, self.max_planes)).round()
                                 .astype(int))
        self._t_draw = 0.0
        self._line = self._line_axis()
        if self._line is None:
            self._make_figure()
        else:
            self._make_line_figure()

    def _start_sweep(self, doc: dict) -> None:
        """A 1D sweep (:data:`SWEEPS`): one curve per quantity, points appended."""
        self._q = sweep_quantities(doc)
        self._active = bool(self._q)
        if not self._active:
            return
        self._start, self._line, self._t_draw = doc, None, 0.0
        self._xs: list[float] = []
        self._ys: list[list[float]] = [[] for _ in self._q]
        key, label, _ = self._sweep
        self.figure = self._new_figure((6.4, 2.4 * len(self._q) + 0.6))
        axes = self.figure.subplots(len(self._q), 1, squeeze=False)[:, 0]
        self._curves = []
        for ax, (title, _, _) in zip(axes, self._q, strict=True):
            (curve,) = ax.plot([], [], ".-", ms=3, lw=0.8)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel(title, fontsize=8)
            ax.tick_params(labelsize=7)
            self._curves.append((ax, [curve]))
        self._title()

    def _sweep_event(self, data: dict) -> None:
        key, _, scale = self._sweep
        if key not in data:
            return
        self._xs.append(float(data[key]) * scale)
        for ys, (_, _, value) in zip(self._ys, self._q, strict=True):
            try:
                ys.append(value(data))
            except (KeyError, IndexError, TypeError):
                ys.append(np.nan)

    def event(self, doc: dict) -> None:
        if not self._active:
            return
        if self._sweep is not None:
            self._sweep_event(doc["data"])
            now = time.monotonic()
            if self._interactive and now - self._t_draw > self.redraw_interval_s:
                self._t_draw = now
                self._draw()
            return
        data = doc["data"]
        idx = self._index(data)
        if idx is None:
            return
        for k, (_, _, value) in enumerate(self._q):
            try:
                self._data[(k, *idx)] = value(data)
            except (KeyError, IndexError, TypeError):
                pass
        now = time.monotonic()
        if self._interactive and now - self._t_draw > self.redraw_interval_s:
            self._t_draw = now
            self._draw()

    def stop(self, doc: dict) -> None:
        if not self._active:
            return
        self._draw()
        if self.out_dir is not None:
            uid = self._start.get("uid", "run")[:8]
            self.save(self.out_dir / f"{self._start.get('plan_name', 'raster')}_{uid}.png")

    # -- drawing ---------------------------------------------------------
    @property
    def _interactive(self) -> bool:
        return matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo")

    def _index(self, data: dict) -> tuple[int, ...] | None:
        out = []
        for axis, (lo, hi), n in zip(self._axes, self._extents, self._shape, strict=True):
            key = f"stage_{axis}_user_setpoint"
            pos = data.get(key, data.get(f"stage_{axis}"))
            if pos is None:
                return None
            i = 0 if n == 1 or hi == lo else int(round((pos - lo) / (hi - lo) * (n - 1)))
            out.append(min(max(i, 0), n - 1))
        return tuple(out)

    def _line_axis(self) -> int | None:
        """1 (y) or 2 (x) if the grid is a line along that lateral axis, else None."""
        ny, nx = self._shape[1], self._shape[2]
        if ny > 1 and nx == 1:
            return 1
        if nx > 1 and ny == 1:
            return 2
        return None

    def _new_figure(self, size: tuple[float, float], layout: str | None = "constrained"
                    ) -> Figure:
        if self._interactive:
            import matplotlib.pyplot as plt

            return plt.figure(figsize=size, layout=layout)
        return Figure(figsize=size, layout=layout)

    def _title(self) -> None:
        plan = self._start.get("plan_name", "")
        self.figure.suptitle(f"{plan}  {self._start.get('uid', '')[:8]}  "
                             f"({self._start.get('scenario', 'instrument')})", fontsize=10)

    def _line_values(self, r: int, plane: int) -> np.ndarray:
        plane_data = self._data[r, plane]
        return plane_data[:, 0] if self._line == 1 else plane_data[0, :]

    def _make_line_figure(self) -> None:
        """One axes per quantity, one curve per plane, along the line's axis."""
        self.figure = self._new_figure((6.4, 2.4 * len(self._q) + 0.6))
        axes = self.figure.subplots(len(self._q), 1, squeeze=False)[:, 0]
        lo, hi = self._extents[self._line]
        coord = np.linspace(lo, hi, self._shape[self._line])
        heights = np.linspace(*self._extents[0], self._shape[0])
        fixed = self._extents[3 - self._line][0]
        name, other = ("y", "x") if self._line == 1 else ("x", "y")
        self._curves = []
        for ax, (title, _, _), r in zip(axes, self._q, range(len(self._q)), strict=True):
            row = [ax.plot(coord, self._line_values(r, p), ".-", ms=3, lw=0.8,
                           label=f"z = {heights[p]:.1f} nm")[0] for p in self._planes]
            ax.set_ylabel(title, fontsize=8)
            ax.set_xlabel(f"tip {name} (nm), {other} = {fixed:g} nm", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
            self._curves.append((ax, row))
        self._title()

    def _draw_lines(self) -> None:
        for r, (ax, row) in enumerate(self._curves):
            if self._sweep is not None:
                row[0].set_data(self._xs, self._ys[r])
            else:
                for line, plane in zip(row, self._planes, strict=True):
                    line.set_ydata(self._line_values(r, plane))
            ax.relim()
            ax.autoscale_view()

    def _make_figure(self) -> None:
        nrow, ncol = len(self._q), len(self._planes)
        size = (2.6 * ncol + 1.2, 2.5 * nrow + 0.6)
        # PNGs only: a fixed layout (a constrained one cost ~60 % of each save's CPU time)
        fixed = not self._interactive
        self.figure = self._new_figure(size, layout=None if fixed else "constrained")
        axes = self.figure.subplots(nrow, ncol, squeeze=False,
                                    gridspec_kw=_fixed_margins(size, nrow, ncol) if fixed else None)
        (ylo, yhi), (xlo, xhi) = self._extents[1], self._extents[2]
        zlo, zhi = self._extents[0]
        heights = np.linspace(zlo, zhi, self._shape[0])
        self._images = []
        for r, (title, cmap, _) in enumerate(self._q):
            row = []
            for c, plane in enumerate(self._planes):
                ax = axes[r, c]
                im = ax.imshow(self._data[r, plane], origin="lower", cmap=cmap, aspect="equal",
                               extent=(xlo, xhi, ylo, yhi), interpolation="nearest")
                ax.set_title(f"z = {heights[plane]:.1f} nm", fontsize=9)
                ax.set_xlabel("x (nm)", fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{title}\ny (nm)", fontsize=8)
                ax.tick_params(labelsize=7)
                row.append(im)
            room = dict(fraction=0.1 / ncol, pad=0.04 / ncol) if fixed else {}
            self.figure.colorbar(row[-1], ax=axes[r, :].tolist(), shrink=0.85, label=title,
                                 **room)
            self._images.append(row)
        self._title()

    def _draw(self) -> None:
        lines = self._line is not None or self._sweep is not None
        if lines:
            self._draw_lines()
        for r, row in enumerate([] if lines else self._images):
            finite = self._data[r][np.isfinite(self._data[r])]
            lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
            for im, plane in zip(row, self._planes, strict=True):
                im.set_data(self._data[r, plane])
                im.set_clim(lo, hi if hi > lo else lo + 1e-9)
        if self._interactive and self.figure is not None:
            self.figure.canvas.draw_idle()
            self.figure.canvas.flush_events()

    def save(self, path: str | Path) -> Path:
        """Write the current figure as a PNG and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(path, dpi=110)
        self.saved.append(path)
        return path
