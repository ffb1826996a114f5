"""LiveSlices (headless): line rasters are drawn as curves, 2D rasters as images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nvmri_bluesky.callbacks.slices import LiveSlices

GATES = [{"name": n, "pulses": []} for n in ("ramsey", "bright", "dark")]


def _start(shape: list[int], extents: list[list[float]]) -> dict:
    return {"uid": "abcdef123456", "plan_name": "ramsey_raster", "scenario": "test",
            "programs": {"ramsey": {"name": "ramsey", "gates": GATES}},
            "grid": {"shape": shape, "axes": ["stage_z", "stage_y", "stage_x"],
                     "extents": extents, "snake": False}}


def _feed(cb: LiveSlices, points: list[tuple[float, float, float]], p0: np.ndarray) -> None:
    for (x, y, z), p in zip(points, p0, strict=True):
        counts = [1000.0 * (0.7 + 0.3 * p), 1000.0, 700.0]
        cb("event", {"data": {"stage_x": x, "stage_y": y, "stage_z": z,
                              "counter_counts": counts}})


def test_a_line_along_y_is_a_line_plot(tmp_path: Path):
    y = np.linspace(-26.0, -22.0, 41)
    p0 = 0.5 + 0.5 * np.cos(2 * np.pi * y / 0.33)
    cb = LiveSlices(out_dir=tmp_path)
    cb("start", _start([1, y.size, 1], [[30.0, 30.0], [y[0], y[-1]], [0.0, 0.0]]))
    _feed(cb, [(0.0, v, 30.0) for v in y], p0)
    cb("stop", {"exit_status": "success"})
    (ax,) = cb.figure.axes
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), y)
    np.testing.assert_allclose(line.get_ydata(), p0, atol=1e-12)
    assert not ax.get_images()
    assert "tip y (nm)" in ax.get_xlabel()
    assert [p.name for p in cb.saved] == ["ramsey_raster_abcdef12.png"]
    assert cb.saved[0].stat().st_size > 0


def test_a_plane_is_an_image(tmp_path: Path):
    xs = np.linspace(-2.0, 2.0, 5)
    cb = LiveSlices(out_dir=tmp_path)
    cb("start", _start([1, 5, 5], [[30.0, 30.0], [-2.0, 2.0], [-2.0, 2.0]]))
    pts = [(x, y, 30.0) for y in xs for x in xs]
    _feed(cb, pts, np.linspace(0, 1, len(pts)))
    cb("stop", {"exit_status": "success"})
    images = [im for ax in cb.figure.axes for im in ax.get_images()]
    assert len(images) == 1
    assert np.isfinite(np.asarray(images[0].get_array())).all()


def test_odmr_sweep_draws_its_spectrum(tmp_path: Path):
    f = np.linspace(6.20e9, 6.30e9, 51)
    dip = 1.0 - 0.15 / (1.0 + ((f - 6.25e9) / 4.2e6) ** 2)
    cb = LiveSlices(out_dir=tmp_path)
    cw = [{"name": n, "pulses": []} for n in ("cw_0", "cw_1")]
    cb("start", {"uid": "0dd0123456", "plan_name": "odmr_sweep",
                 "programs": {"cw_odmr": {"name": "cw_odmr", "gates": cw}}})
    for fi, d in zip(f, dip, strict=True):
        cb("event", {"data": {"mw_frequency": fi, "counter_counts": [3000.0 * d, 3000.0]}})
    cb("stop", {"exit_status": "success"})
    (ax,) = cb.figure.axes
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), f * 1e-9)
    np.testing.assert_allclose(line.get_ydata(), dip, rtol=1e-12)
    assert [p.name for p in cb.saved] == ["odmr_sweep_0dd01234.png"]
