"""The frequency lock over the whole envelope: NVs 6 to 16 nm deep (issue 11, point 4).

Close to a shallow NV the tip moves the NV line by more than a GHz.  A PSF map
is measured from the highest apex down and stops descending where the lock
could not follow (:class:`~nvmri_bluesky.plans.rasters.Descent`); a lock that
cannot follow ends its run with a stop document saying where and why, and
``nvmri demo`` still writes its report, with the step it could not do.

- pure functions: the per-plane miss extrapolation, the descent's decisions,
  the lowest lockable apex of a measured map, maps that stopped descending;
- the descent over the envelope with the exact physics (the truth, which
  only tests may use) on the protocol's own map grids;
- against the IOC subprocess: a map that stops descending, a DEER raster
  whose lock is lost, and ``nvmri demo`` on an NV 6.8 nm deep (default
  protocol) and on a sample whose counter drops out.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reconstruct_synth as syn
from bluesky.utils import Msg
from services import run_demo

from nvmri_bluesky import physics, plans
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans.lock import (
    LOCK_REACH_HZ,
    PLANE_GROWTH,
    LockLost,
    Predictor,
    next_plane_miss_hz,
)
from nvmri_bluesky.plans.rasters import Descent, approach_heights
from nvmri_bluesky.reconstruct import lockable
from nvmri_bluesky.reconstruct import protocol as design
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant, dark_detuning_map
from nvmri_bluesky.reconstruct.runs import run_dataset

ENVELOPE_DEPTHS_NM = (6.0, 6.8, 7.3, 8.0, 10.0, 13.0, 16.0)
LOCK_TOLERANCE = 0.10
"""A locked frequency must be within this fraction of the CW line width of the truth."""


# ---------------------------------------------------------------- pure functions


def test_next_plane_miss_extrapolates_the_growth_per_plane() -> None:
    assert next_plane_miss_hz([]) == 0.0
    assert next_plane_miss_hz([100e6]) == pytest.approx(PLANE_GROWTH * 100e6)
    assert next_plane_miss_hz([100e6, 150e6]) == pytest.approx(225e6)
    # misses that shrank (a coarse first plane) never predict a shrinking next plane
    assert next_plane_miss_hz([300e6, 150e6]) == pytest.approx(150e6)


def test_descent_stops_before_a_plane_beyond_reach_and_says_why() -> None:
    descent = Descent(planes=4, reach_hz=600e6)
    for z, miss in ((33.0, 100e6), (25.0, 200e6)):
        assert descent.allows(z)
        descent.record(z, miss)
        descent.record(z, -0.5 * miss)                       # the worst |miss| is kept
    assert descent.misses == {33.0: 100e6, 25.0: 200e6}
    assert descent.allows(17.0)                             # 400 MHz expected: inside reach
    descent.record(17.0, 400e6)
    assert descent.reason is None
    assert not descent.allows(9.0)                          # 800 MHz expected: beyond
    assert not descent.allows(9.0) and not descent.allows(1.0)
    assert descent.reason == (
        "map stopped at apex 9 nm: the planes above predict prediction misses of 800 MHz "
        "there, beyond the lock's reach (+/-600 MHz); the map covers apex 17..33 nm")
    # the run's close_run message carries the reason, nothing else changes
    closed = descent.closing(Msg("close_run", None, exit_status=None))
    assert closed.kwargs == {"exit_status": None, "reason": descent.reason}
    other = Msg("set", None, 1.0, group="g")
    assert descent.closing(other) is other


def test_descent_drops_the_plane_where_the_lock_was_lost() -> None:
    descent = Descent(planes=3)
    assert descent.allows(40.0)
    descent.record(40.0, 50e6)
    assert descent.allows(30.0)
    descent.lost(30.0, LockLost("lock at tip (1.00, 2.00, 30.00) nm: no NV line"))
    assert not descent.allows(30.0) and not descent.allows(20.0)
    assert descent.misses == {40.0: 50e6}
    assert descent.reason == ("map stopped at apex 30 nm: lock at tip (1.00, 2.00, 30.00) nm: "
                              "no NV line; the map covers apex 40..40 nm")


def test_a_line_leaves_out_the_points_the_lock_could_not_follow() -> None:
    descent = Descent(planes=1)
    assert descent.allows(10.0)
    descent.lost(10.0, LockLost("lock at tip (-36.00, 0.00, 10.00) nm: no NV line"))
    assert descent.allows(10.0)                             # the next point is tried
    descent.lost(10.0, LockLost("lock at tip (-34.00, 0.00, 10.00) nm: no NV line"))
    assert descent.reason == ("2 point(s) left out where the lock could not follow, the "
                              "first: lock at tip (-36.00, 0.00, 10.00) nm: no NV line")


def _line_map(depth_nm: float, z: tuple[float, float, int]) -> DetuningInterpolant:
    inst = syn.instrument(depth_nm)
    psf = syn.psf_map(inst, np.linspace(-40, 40, 21), np.linspace(-40, 40, 21), np.linspace(*z),
                      np.random.default_rng(5))
    return lockable.line_shift_map(psf)


def _true_raster_miss(depth_nm: float, x: tuple, y: tuple, z_nm: float) -> float:
    """The linear predictor's worst miss on a raster plane, from the exact physics, Hz."""
    inst = syn.instrument(depth_nm)
    gx, gy = np.meshgrid(np.linspace(*x), np.linspace(*y), indexing="ij")
    tips = np.stack([gx, gy, np.full_like(gx, z_nm)], -1)
    f = physics.nv_transition_frequencies(inst.field_at(inst.nv_position_nm, tips),
                                          inst.nv_axis)[0]
    return max(float(np.abs(np.diff(f, 2, axis=a)).max()) for a in (0, 1))


def test_lowest_lockable_apex_follows_the_measured_map() -> None:
    """From the measured f+ map: at the apex returned the predictor's misses are within the
    reach, 1 nm lower they are not; a shallower NV gets a higher apex."""
    x = y = (-20.0, 20.0, 9)                                 # 5 nm steps
    reach = 60e6
    lowest = {}
    for depth in (6.0, 16.0):
        line = _line_map(depth, (9.0, 33.0, 13))
        z = lockable.lowest_lockable_apex_nm(line, x, y, reach_hz=reach)
        assert 9.0 < z < 33.0, z
        assert _true_raster_miss(depth, x, y, z) <= 1.05 * reach
        assert _true_raster_miss(depth, x, y, z - 1.0) > 0.95 * reach
        lowest[depth] = z
    assert lowest[6.0] > lowest[16.0] + 3.0, lowest
    # a deep NV with a wide reach: the whole map is lockable, never below its bottom
    assert lockable.lowest_lockable_apex_nm(_line_map(16.0, (9.0, 33.0, 13)), x, y) == 9.0
    with pytest.raises(NvmriError, match="cannot follow"):
        lockable.lowest_lockable_apex_nm(_line_map(6.0, (9.0, 33.0, 13)), x, y, reach_hz=1e3)
    with pytest.raises(NvmriError, match="leaves the measured map"):
        lockable.lowest_lockable_apex_nm(_line_map(6.0, (9.0, 33.0, 13)), (-80.0, 0.0, 5), y)


def test_a_map_that_stopped_descending_uses_its_complete_planes() -> None:
    inst = syn.instrument(8.0)
    psf = syn.psf_map(inst, np.linspace(-40, 40, 9), np.linspace(-40, 40, 9),
                      np.linspace(9.0, 49.0, 6), np.random.default_rng(3))
    full = DetuningInterpolant.from_map(dark_detuning_map(psf))
    cut = psf.copy(deep=True)
    for key in ("lock_frequency", "lock_f_minus"):
        cut[key][:, :, 0] = np.nan                           # apex 9: never reached
        cut[key][:4, :, 1] = np.nan                          # apex 17: cut short
    part = DetuningInterpolant.from_map(dark_detuning_map(cut))
    np.testing.assert_allclose(part.bounds[2], [25.0, 49.0])
    inside = np.array([[3.0, -7.0, 30.0], [-20.0, 12.0, 38.0]])
    np.testing.assert_allclose(part(inside), full(inside), rtol=0.02)
    assert np.isnan(part([[3.0, -7.0, 20.0]])).all()


# ---------------------------------------------------------------- the envelope (truth)


def _grid_points(x: tuple, y: tuple, z: tuple) -> np.ndarray:
    """A snaked grid_scan's points, z slowest (top down), x fastest."""
    xs, ys, zs = (np.linspace(*a) for a in (x, y, z))
    points, row = [], 0
    for k, zz in enumerate(zs):
        for yy in ys if k % 2 == 0 else ys[::-1]:
            points += [(xx, yy, zz) for xx in (xs if row % 2 == 0 else xs[::-1])]
            row += 1
    return np.array(points)


def _follow(depth_nm: float, grid: dict) -> tuple[Descent, int]:
    """The descent of a PSF map over the exact lines (both transitions), with the lock's
    predictors; a miss beyond the lock's reach loses the lock there.  (descent, losses)."""
    inst = syn.instrument(depth_nm)
    z_lo, z_hi = sorted(grid["z"][:2])
    points = _grid_points(grid["x"], grid["y"], (z_hi, z_lo, grid["z"][2]))
    f_plus, f_minus = physics.nv_transition_frequencies(
        inst.field_at(inst.nv_position_nm, points), inst.nv_axis)
    f0 = physics.nv_transition_frequencies(inst.b0_vector, inst.nv_axis)
    lines = [(Predictor(float(f0[0])), f_plus), (Predictor(abs(float(f0[1]))), np.abs(f_minus))]
    for z in approach_heights(points[0][2]):                  # psf_map's approach
        p = np.array([points[0][0], points[0][1], z])
        exact = physics.nv_transition_frequencies(inst.field_at(inst.nv_position_nm, p),
                                                  inst.nv_axis)
        for (predict, _), f in zip(lines, (exact[0], abs(exact[1])), strict=True):
            assert abs(predict(p) - f) < LOCK_REACH_HZ
            predict.add(p, f)
    descent, losses = Descent(planes=grid["z"][2]), 0
    for i, p in enumerate(points):
        if not descent.allows(p[2]):
            continue
        misses = [abs(predict(p) - f[i]) for predict, f in lines]
        if max(misses) > LOCK_REACH_HZ:
            losses += 1
            descent.lost(p[2], LockLost(f"miss {max(misses) / 1e6:.0f} MHz at {p}"))
            continue
        for predict, f in lines:
            predict.add(p, f[i])
        descent.record(p[2], max(misses))
    return descent, losses


@pytest.mark.parametrize("depth_nm", ENVELOPE_DEPTHS_NM)
def test_the_protocol_maps_follow_the_line_over_the_envelope(depth_nm: float) -> None:
    """The protocol's PSF maps, top down: the spin map is complete, the layer map reaches
    the apex a surface layer needs from the 28 nm plane (28 nm - depth), and the lock is
    never lost for NVs from 6.8 nm deep.  (6.0 nm deep, the ms=0->+1 line jumps by 1.2
    GHz between two points of the lowest layer plane: the map stops there, with the
    reason, and keeps the three planes above.)"""
    spin, spin_losses = _follow(depth_nm, design.SPIN_PSF_MAP)
    assert spin.reason is None and spin_losses == 0
    assert len(spin.misses) == design.SPIN_PSF_MAP["z"][2]
    layer, layer_losses = _follow(depth_nm, design.LAYER_PSF_MAP)
    assert min(layer.misses) <= design.LAYER_PLANES_NM[0] - depth_nm, layer.reason
    assert all(m <= LOCK_REACH_HZ for m in layer.misses.values())
    if depth_nm >= 6.8:
        assert layer_losses == 0 and layer.reason is None, layer.reason
        assert len(layer.misses) == design.LAYER_PSF_MAP["z"][2]
    else:                  # three planes: one short of a cubic spline (known gap)
        assert layer.reason.startswith("map stopped at apex 9 nm: miss"), layer.reason
        assert len(layer.misses) == design.LAYER_PSF_MAP["z"][2] - 1


# ---------------------------------------------------------------- against the IOC


def _split(docs: list[tuple[str, dict]]) -> tuple[dict, list[dict], dict]:
    start = next(d for n, d in docs if n == "start")
    primary = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary")
    events = [d for n, d in docs if n == "event" and d["descriptor"] == primary]
    stop = next(d for n, d in docs if n == "stop")
    return start, events, stop


@pytest.mark.timeout(300)
def test_psf_map_stops_descending_where_the_lock_could_not_follow(make_ioc: Any,
                                                                    collect: Any) -> None:
    """NV 8 nm deep, 20 nm lateral steps, planes 41..5 nm: the misses of the three planes
    above extrapolate beyond the lock's reach at apex 5 nm, so the map stops there; the
    run succeeds with that reason and every point measured is locked to the truth."""
    handle, nv = make_ioc({"name": "shallow", "seed": 8, "nv": {"depth_nm": 8.0}})
    inst = handle.scenario.instrument()
    x, y, z = (-60.0, 60.0, 7), (-24.0, 24.0, 3), (5.0, 41.0, 4)
    docs = collect(plans.psf_map(nv, x=x, y=y, z=z, shots=300_000))
    start, events, stop = _split(docs)
    assert stop["exit_status"] == "success"
    assert stop["reason"].startswith("map stopped at apex 5 nm: the planes above predict "
                                     "prediction misses of"), stop["reason"]
    assert stop["reason"].endswith("the map covers apex 17..41 nm"), stop["reason"]
    heights = sorted({round(e["data"]["stage_z"], 3) for e in events})
    assert heights == [17.0, 29.0, 41.0]
    assert len(events) == 3 * 7 * 3
    assert [e["data"]["stage_z"] for e in events] == sorted(
        (e["data"]["stage_z"] for e in events), reverse=True)             # top down
    tolerance = LOCK_TOLERANCE / inst.tau_cw_s
    for e in events:
        d = e["data"]
        tip = [d["stage_x"], d["stage_y"], d["stage_z"]]
        f_plus, f_minus = physics.nv_transition_frequencies(
            inst.field_at(inst.nv_position_nm, tip), inst.nv_axis)
        assert abs(d["lock_frequency"] - f_plus) < tolerance, tip
        assert abs(d["lock_minus_frequency"] - abs(f_minus)) < tolerance, tip
    ds = run_dataset(start, events, stop)
    assert ds.attrs["stop_reason"] == stop["reason"]
    assert np.isnan(ds["lock_frequency"].sel(z=5.0)).all()
    assert np.isfinite(ds["lock_frequency"].sel(z=[17.0, 29.0, 41.0])).all()


@pytest.mark.timeout(300)
def test_deer_raster_that_loses_the_lock_ends_with_where_and_why(make_ioc: Any,
                                                                  RE: Any) -> None:
    """A 2 GHz bias jump (beyond the lock's reach) during a DEER raster: the run fails with
    a stop document naming the tip position and the search, the points before stay."""
    after = 12
    handle, nv = make_ioc({"name": "jump", "seed": 3,
                           "faults": [{"kind": "frequency_jump", "after_acquisitions": after,
                                       "hz": 2e9}]})
    inst = handle.scenario.instrument()
    docs: list[tuple[str, dict]] = []
    token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
    f_start = float(inst.f_nv([-4.0, -4.0, 40.0]))
    try:
        with pytest.raises(LockLost, match=r"lock at tip \(-?\d+\.\d\d, -?\d+\.\d\d, "
                                           r"40\.00\) nm: frequency lock lost near"):
            RE(plans.deer_raster(nv, x=(-4.0, 4.0, 5), y=(-4.0, 4.0, 5), z=40.0,
                                 rf_frequency_hz=inst.f_dark0, tau_s=2e-6,
                                 mw_frequency_hz=f_start, shots=100_000))
    finally:
        RE.unsubscribe(token)
    start, events, stop = _split(docs)
    assert stop["exit_status"] == "fail"
    assert "lock at tip (" in stop["reason"] and "no NV line within +/-600 MHz" in stop["reason"]
    assert 0 < len(events) < 25
    assert all(e["data"]["counter_acq_id"] <= after for e in events)


# ---------------------------------------------------------------- nvmri demo


def _demo(tmp_path: Path, scenario: dict, *options: str) -> tuple[subprocess.CompletedProcess,
                                                                   Path]:
    return run_demo(tmp_path, scenario, *options)


@pytest.mark.timeout(900)
def test_demo_reports_the_step_whose_lock_could_not_follow(tmp_path: Path) -> None:
    """The counter drops out for three acquisitions inside the spin protocol's PSF map (its
    first plane): the lock loses the line there, the map stops with the reason, the spin
    step is reported as not done, and the calibration after it is still measured and
    reported."""
    scenario = {"name": "dropout", "seed": 5, "nv": {"depth_nm": 9.0},
                "faults": [{"kind": "counter_dropout", "after_acquisitions": 60,
                            "count": 3}]}
    proc, out = _demo(tmp_path, scenario, "--steps", "spins,calibration", "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [(e["sample"], e["step"]) for e in report["not_done"]] == [("dropout", "spins")]
    assert "at least 3 points along x, y and z" in report["not_done"][0]["reason"]
    assert "not done" in proc.stderr
    assert np.isfinite(report["gradient_gauss_per_nm"]["value"])
    assert {"dropout/gradient_line", "dropout/cw_slice"} <= set(report["runs"])
    from nvmri_bluesky.catalog import open_catalog

    with open_catalog(str(out / "catalog")) as cat:
        stops = [cat.run(row.uid).metadata["stop"] for row in cat.runs()
                 if cat.run(row.uid).metadata["start"].get("measurement") == "psf_map"]
    assert len(stops) == 1
    reason = stops[0]["reason"]
    assert re.match(r"map stopped at apex 40 nm: lock(_minus)? at tip \(", reason), stops
    assert "frequency lock lost near" in stops[0]["reason"], stops
    assert stops[0]["reason"].endswith("no plane is complete"), stops


def test_the_approach_reaches_a_low_first_point_in_uniform_steps() -> None:
    assert approach_heights(10.0) == [58.0, 50.0, 42.0, 34.0, 26.0, 18.0]
    assert approach_heights(40.0) == [56.0, 48.0]
    assert approach_heights(55.0) == [] and approach_heights(80.0) == []
    assert approach_heights(10.0, top_nm=30.0, step_nm=10.0) == [30.0, 20.0]
