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
