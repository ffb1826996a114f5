"""runs -> xarray: grid placement, gate unpacking, signed f-, and runs cut short."""

import numpy as np

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct.runs import run_dataset

GATES = ["signal", "echo", "bright", "dark", "lock_0", "lock_1", "lock_2"]


def _start(plan="deer_raster", shape=(1, 3, 3)):
    return {"uid": "abc", "plan_name": plan, "scenario": "s",
            "programs": {"deer": {"gates": [{"name": g} for g in GATES]}},
            "plan_args": {"tau_s": 8e-6, "rf_frequency_hz": 3.4e9, "shots": 1000},
            "grid": {"shape": list(shape), "axes": ["stage_z", "stage_y", "stage_x"],
                     "extents": [[30.0, 30.0], [-2.0, 2.0], [-4.0, 4.0]], "snake": True}}


def _event(x, y, z, k, extra=None):
    data = {"stage_x": x, "stage_y": y, "stage_z": z,
            "counter_counts": [10.0 * k + i for i in range(len(GATES))],
            "lock_frequency": 6.3e9 + k, "lock_error": 0.0, "deer_contrast": 0.1 * k}
    data.update(extra or {})
    return {"data": data}


def test_raster_points_land_on_the_grid_and_gates_are_unpacked():
    points = [(x, y) for y in (-2.0, 0.0, 2.0) for x in (-4.0, 0.0, 4.0)]
    events = [_event(x, y, 30.0, k) for k, (x, y) in enumerate(points)]
    ds = run_dataset(_start(), events, {"exit_status": "success"})
    assert ds.attrs["complete"] and ds.attrs["points_measured"] == 9
    assert ds.attrs["tau_s"] == 8e-6 and ds.attrs["exit_status"] == "success"
    assert ds["signal"].sel(x=4.0, y=2.0, z=30.0) == 80.0
    assert ds["dark"].sel(x=-4.0, y=-2.0, z=30.0) == 3.0
    assert ds["x"].attrs["units"] == "nm"


def test_a_run_cut_short_keeps_its_points_and_says_so():
    events = [_event(x, -2.0, 30.0, k) for k, x in enumerate((-4.0, 0.0, 4.0))]
    events.append(_event(4.0, 0.0, 30.0, 3))
    ds = run_dataset(_start(), events, {"exit_status": "abort"})
    assert not ds.attrs["complete"]
    assert (ds.attrs["points_measured"], ds.attrs["points_planned"]) == (4, 9)
    assert int(np.isfinite(ds["signal"]).sum()) == 4
    assert np.isnan(float(ds["signal"].sel(x=-4.0, y=2.0, z=30.0)))


def test_f_minus_is_signed_as_physics_above_the_anticrossing():
    fp, fm = physics.nv_transition_frequencies(physics.Instrument().b0_vector,
                                               physics.Instrument().nv_axis)
    start = _start("psf_map", shape=(1, 1, 2))
    start["grid"]["extents"][1] = [0.0, 0.0]
    events = [_event(x, 0.0, 30.0, 0, {"lock_frequency": float(fp),
                                       "lock_minus_frequency": abs(float(fm))})
              for x in (-4.0, 4.0)]
    ds = run_dataset(start, events)
    assert np.allclose(ds["lock_f_minus"], float(fm)) and float(fm) < 0


def _line_across_the_tilted_nv(depth_nm: float = 6.2, z_nm: float = 15.0, num: int = 37):
    """Exact (f+, f-) along x at apex ``z_nm`` over an NV ``depth_nm`` deep (seed 3 of
    ``nvmri validate``): far out on the -x side the tip's field across the NV axis bends
    f+ below 2D while f- stays negative."""
    inst = physics.Instrument(nv_depth_nm=depth_nm)
    xs = np.linspace(-40.0, 50.0, num)
    tips = np.stack([xs, np.zeros_like(xs), np.full_like(xs, z_nm)], -1)
    b = inst.b0_vector + physics.tip_field(inst.nv_position_nm, tips, inst.tip_radius_nm,
                                           inst.tip_moment_am2)
    fp, fm = physics.nv_transition_frequencies(b, inst.nv_axis)
    f0 = physics.nv_transition_frequencies(inst.b0_vector, inst.nv_axis)
    return xs, fp, fm, f0


def test_f_minus_signs_follow_the_lock_path_where_f_plus_is_below_2d():
    xs, fp, fm, _ = _line_across_the_tilted_nv()
    bent = (fp < 2 * physics.D_ZFS) & (fm < 0)
    assert bent.any()                                  # where "f+ > 2D" gets the sign wrong
    for path in (np.arange(len(xs)), np.arange(len(xs))[::-1]):      # either direction
        signs = physics.minus_transition_signs(fp[path], np.abs(fm[path]))
        assert np.array_equal(signs, np.sign(fm[path]))


def test_a_psf_map_line_signs_f_minus_by_continuity():
    xs, fp, fm, (fp0, fm0) = _line_across_the_tilted_nv()
    start = _start("psf_map", shape=(1, 1, len(xs)))
    start["grid"]["extents"] = [[15.0, 15.0], [0.0, 0.0], [float(xs[0]), float(xs[-1])]]
    start.update(f_nv0_hz=float(fp0), f_minus0_hz=float(fm0))
    events = [dict(_event(x, 0.0, 15.0, 0, {"lock_frequency": float(p),
                                           "lock_minus_frequency": abs(float(m))}), seq_num=i + 1)
              for i, (x, p, m) in enumerate(zip(xs, fp, fm, strict=True))]
    ds = run_dataset(start, events)
    np.testing.assert_allclose(ds["lock_f_minus"].values.ravel(), fm)
