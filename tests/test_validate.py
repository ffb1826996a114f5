"""``nvmri validate``: the sample generator and the grader (pure functions, no demo runs)."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest

from nvmri_bluesky import physics
from nvmri_bluesky.cli import build_parser
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.sim.scenario import load_scenario
from nvmri_bluesky.validate.generator import KINDS, Truth, draw_sample
from nvmri_bluesky.validate.grader import (
    AXES,
    grade_report,
    grade_sample,
    instrument_time_s,
    summarise,
)
from nvmri_bluesky.validate.runner import run_sample
from nvmri_bluesky.validate.text import table

SEEDS = range(120)
AXIS = physics.Instrument().nv_axis


# ---------------------------------------------------------------- generator

@pytest.mark.parametrize("seed", SEEDS)
def test_every_sample_is_inside_the_envelope(seed):
    t = draw_sample(seed)
    low, high = (6.0, 7.0) if t.kind == "shallow" else (6.0, 16.0)
    assert low <= t.depth_nm <= high
    assert len(t.spins) <= 3 and len(t.couplings_hz) == len(t.spins)
    for offset, nu in zip(t.spins, t.couplings_hz, strict=True):
        dx, dy, dz = offset
        assert abs(dx) <= 8.0 and abs(dy) <= 8.0 and -6.0 <= dz <= 2.0
        assert np.linalg.norm(offset) >= 3.0
        assert abs(nu) >= 50e3
        assert nu == pytest.approx(float(physics.dipolar_coupling(np.array(offset), AXIS)))
    for a, b in combinations(t.spins, 2):
        assert np.linalg.norm(np.subtract(a, b)) >= 3.0
    if t.layer_density_per_nm2 is not None:
        assert 0.1 <= t.layer_density_per_nm2 <= 1.0
        assert t.layer_height_nm == t.depth_nm


def test_the_first_nine_seeds_cover_every_named_case():
    truths = [draw_sample(s) for s in range(9)]
    assert [t.kind for t in truths] == list(KINDS)
    by_kind = {t.kind: t for t in truths}
    assert len(by_kind["single"].spins) == 1 and by_kind["single"].layer_height_nm is None
    assert len(by_kind["pair"].spins) == 2
    assert not by_kind["layer"].spins and by_kind["layer"].layer_height_nm is not None
    assert len(by_kind["spin+layer"].spins) == 1
    assert by_kind["spin+layer"].layer_height_nm is not None
    assert not by_kind["empty"].spins and by_kind["empty"].layer_height_nm is None
    assert 6.0 <= by_kind["shallow"].depth_nm <= 7.0


@pytest.mark.parametrize("seed", [s for s in SEEDS if draw_sample(s).kind == "weak+strong"])
def test_weak_beside_strong_is_a_tenth_of_the_coupling(seed):
    strong, weak = (abs(nu) for nu in draw_sample(seed).couplings_hz)
    assert 0.09 <= weak / strong <= 0.11


def test_the_random_kind_spans_zero_to_three_spins_with_and_without_layer():
    randoms = [draw_sample(s) for s in SEEDS if draw_sample(s).kind == "random"]
    assert {len(t.spins) for t in randoms} == {0, 1, 2, 3}
    assert {t.layer_height_nm is None for t in randoms} == {True, False}


def test_seeds_are_reproducible_and_distinct():
    assert draw_sample(17) == draw_sample(17)
    assert draw_sample(17).scenario() == draw_sample(17).scenario()
    depths = {draw_sample(s).depth_nm for s in SEEDS}
    assert len(depths) == len(SEEDS)


def test_negative_seed_is_refused():
    with pytest.raises(NvmriError, match="seeds must be >= 0"):
        draw_sample(-1)


@pytest.mark.parametrize("seed", range(18))
def test_scenario_files_load_and_put_the_spins_where_the_truth_says(seed, tmp_path):
    t = draw_sample(seed)
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(t.scenario()))
    s = load_scenario(path)
    assert s.name == t.name and s.seed == seed and s.nv.depth_nm == t.depth_nm
    nv = np.array([0.0, 0.0, -t.depth_nm])
    points = np.array([[p.x_nm, p.y_nm, p.z_nm] for p in s.dark_spins.points]).reshape(-1, 3)
    np.testing.assert_allclose(points - nv, np.array(t.spins).reshape(-1, 3), atol=1e-9)
    if t.layer_density_per_nm2 is None:
        assert s.dark_spins.layers == ()
    else:
        (layer,) = s.dark_spins.layers
        assert layer.z_nm == 0.0 and layer.density_per_nm2 == t.layer_density_per_nm2
    couplings = physics.dipolar_coupling(points - nv, s.instrument().nv_axis)
    np.testing.assert_allclose(couplings, t.couplings_hz)


# ---------------------------------------------------------------- grader

def q(value, sigma):
    return {"value": value, "sigma": sigma}


def spin(dx, dy, dz, sigma=0.05):
    return {"dx_nm": q(dx, sigma), "dy_nm": q(dy, sigma), "dz_nm": q(dz, sigma),
            "coupling_hz": q(1e5, 1e3)}


def layer(height, density, h_sigma=0.1, d_sigma=0.03):
    return {"height_above_nv_nm": q(height, h_sigma), "density_per_nm2": q(density, d_sigma)}


TWO = Truth(seed=0, kind="pair", depth_nm=10.0, spins=((4.0, 5.0, -3.0), (-4.0, -2.0, 1.0)),
            couplings_hz=(1e5, 2e5))
LAYERED = Truth(seed=1, kind="spin+layer", depth_nm=12.0, spins=((1.0, -3.0, -4.0),),
                couplings_hz=(3e5,), layer_density_per_nm2=0.5)


def test_a_correct_report_passes_whatever_the_order_of_its_spins():
    report = {"spins": [spin(-4.02, -1.97, 1.01), spin(4.03, 5.0, -3.02)], "layers": []}
    g = grade_report(TWO, report)
    assert g["passed"] and g["causes"] == []
    assert (g["spins_found"], g["spins_missed"], g["spins_spurious"]) == (2, 0, 0)
    assert sorted(e for e, _ in g["errors"]["dx"]) == pytest.approx([-0.02, 0.03])


def test_missed_and_spurious_spins_are_named():
    report = {"spins": [spin(4.0, 5.0, -3.0), spin(-4.0, 6.0, 1.0)]}
    g = grade_report(TWO, report)
    assert (g["spins_found"], g["spins_missed"], g["spins_spurious"]) == (1, 1, 1)
    assert "missed spin at (-4.00, -2.00, +1.00) nm, 200 kHz" in g["causes"]
    assert ("spurious spin at (-4.00, +6.00, +1.00) nm; nearest true spin off by +8.00 nm, "
            "160.0 sigma on dy") in g["causes"]
    assert not g["passed"]


def test_gate_is_three_sigma_or_one_nm_per_axis():
    one = Truth(seed=2, kind="single", depth_nm=9.0, spins=((0.0, 4.0, -3.0),),
                couplings_hz=(1e5,))
    assert grade_report(one, {"spins": [spin(0.95, 4.0, -3.0, sigma=0.1)]})["spins_found"] == 1
    assert grade_report(one, {"spins": [spin(1.05, 4.0, -3.0, sigma=0.1)]})["spins_found"] == 0
    assert grade_report(one, {"spins": [spin(1.4, 4.0, -3.0, sigma=0.5)]})["spins_found"] == 1


def test_offset_beyond_three_sigma_or_0p3_nm_and_wide_sigmas_fail():
    one = Truth(seed=3, kind="single", depth_nm=9.0, spins=((0.0, 4.0, -3.0),),
                couplings_hz=(1e5,))
    g = grade_report(one, {"spins": [spin(0.2, 4.0, -3.0, sigma=0.05)]})
    assert g["spins_found"] == 1
    assert g["causes"] == ["spin at (+0.00, +4.00, -3.00): offset 4.0 sigma on dx (+0.20 nm)"]
    g = grade_report(one, {"spins": [spin(0.0, 4.4, -3.0, sigma=0.2)]})
    assert g["causes"] == ["spin at (+0.00, +4.00, -3.00): offset +0.40 nm on dy (> 0.3 nm)"]
    g = grade_report(one, {"spins": [spin(0.0, 4.0, -3.1, sigma=0.6)]})
    assert all("sigma 0.60 nm on" in c for c in g["causes"]) and len(g["causes"]) == 3


def test_zero_or_missing_sigma_and_undetermined_values_are_failures():
    one = Truth(seed=4, kind="single", depth_nm=9.0, spins=((0.0, 4.0, -3.0),),
                couplings_hz=(1e5,))
    zero = spin(0.0, 4.0, -3.0)
    zero["dz_nm"] = q(-3.0, 0.0)
    g = grade_report(one, {"spins": [zero]})
    assert g["spins_found"] == 1 and "dz = -3 +/- 0 (failed fit)" in g["causes"][0]
    assert g["errors"]["dz"] == [[0.0, None]]
    undetermined = spin(0.0, 4.0, -3.0)
    undetermined["dx_nm"] = {"value": None, "sigma": None, "why": "fit ended on a bound"}
    g = grade_report(one, {"spins": [undetermined]})
    assert (g["spins_found"], g["spins_missed"], g["spins_spurious"]) == (0, 1, 1)
    assert "spurious spin at (dx not determined (fit ended on a bound))" in g["causes"]


def test_layers_found_missed_and_spurious():
    good = grade_report(LAYERED, {"spins": [spin(1.0, -3.0, -4.0)], "layers": [layer(12.4, 0.55)]})
    assert good["passed"] and good["layers_found"] == 1
    assert good["layer"]["height_error_nm"] == pytest.approx(0.4)
    far = grade_report(LAYERED, {"spins": [spin(1.0, -3.0, -4.0)], "layers": [layer(17.5, 0.5)]})
    assert (far["layers_found"], far["layers_missed"], far["layers_spurious"]) == (0, 1, 1)
    assert far["causes"] == ["missed layer (height 12.00 nm, 0.50/nm^2)",
                             "spurious layer (height 17.50 nm)"]
    g = grade_report(TWO, {"spins": [spin(4, 5, -3), spin(-4, -2, 1)], "layers": [layer(9.7, 0.3)]})
    assert g["layers_spurious"] == 1 and g["causes"] == ["spurious layer (height 9.70 nm)"]


def test_layer_height_and_density_tolerances():
    wide = grade_report(LAYERED, {"spins": [spin(1.0, -3.0, -4.0)],
                                  "layers": [layer(13.5, 0.5, h_sigma=0.6)]})
    assert wide["layers_found"] == 1
    assert wide["causes"] == ["layer height off by +1.50 nm (> 1.0 nm)"]
    dense = grade_report(LAYERED, {"spins": [spin(1.0, -3.0, -4.0)], "layers": [layer(12, 0.8)]})
    assert dense["causes"] == ["layer density 0.80 vs 0.50/nm^2 (+60 %)"]
    null = grade_report(LAYERED, {"spins": [spin(1.0, -3.0, -4.0)], "layers": [
        {"height_above_nv_nm": q(12.1, 0.2),
         "density_per_nm2": {"value": None, "sigma": None, "why": "decay too shallow"}}]})
    assert null["causes"] == ["layer density not determined (decay too shallow)"]


def test_an_empty_sample_with_an_empty_report_passes():
    empty = Truth(seed=6, kind="empty", depth_nm=8.0)
    g = grade_report(empty, {"spins": [], "layers": [], "detection_limit_hz": 31e3})
    assert g["passed"] and g["detection_limit_hz"] == 31e3


def test_a_failed_run_is_an_error_with_the_last_line_of_stderr():
    stderr = ("== sample validate-0000: calibration\n"
              "nvmri demo: error: frequency lock lost near 3.0065 GHz\n\n")
    g = grade_sample(TWO, 2, None, stderr, wall_s=12.0)
    assert g["status"] == "error" and not g["passed"]
    assert g["causes"] == ["nvmri demo: error: frequency lock lost near 3.0065 GHz"]
    assert (g["spins_missed"], g["spins_found"]) == (2, 0)
    assert grade_sample(TWO, 0, None)["causes"] == ["exit 0 but no readable report.json"]
    ok = grade_sample(TWO, 0, {"spins": [spin(4, 5, -3), spin(-4, -2, 1)]}, wall_s=3.0)
    assert ok["status"] == "pass" and ok["wall_s"] == 3.0


@pytest.mark.parametrize(("report", "expected"), [
    ({}, None),
    ({"instrument_time_s": 812.5}, 812.5),
    ({"instrument_time_s": {"total": 40.0, "runs": {"a": 1.0}}}, 40.0),
    ({"instrument_time_s": {"psf_map": 10.0, "deer_raster": 5.0}}, 15.0),
    ({"instrument_time_s": {"value": 7.0, "sigma": None}}, 7.0),
])
def test_instrument_time_is_read_when_present(report, expected):
    assert instrument_time_s(report) == expected


def _sample_with_errors(z_values, sigma=0.1, status="pass"):
    errors = [[z * sigma, sigma] for z in z_values]
    return {"seed": 0, "kind": "single", "truth": "", "status": status, "passed": True,
            "spins_true": len(z_values), "spins_found": len(z_values), "spins_missed": 0,
            "spins_spurious": 0, "layers_true": 0, "layers_found": 0, "layers_missed": 0,
            "layers_spurious": 0, "errors": {a: list(errors) for a in AXES},
            "causes": [], "wall_s": 100.0, "instrument_time_s": None}


def test_coverage_arithmetic_and_criteria():
    s = summarise([_sample_with_errors([0.5, -1.5]), _sample_with_errors([2.5, -3.5, 0.2])])
    cov = s["axes"]["dx"]["coverage"]
    assert cov == {"1sigma": pytest.approx(0.4), "2sigma": pytest.approx(0.6),
                   "3sigma": pytest.approx(0.8)}
    assert s["axes"]["dy"]["max_abs_error_nm"] == pytest.approx(0.35)
    assert s["axes"]["dz"]["median_abs_error_nm"] == pytest.approx(0.15)
    assert s["spins_found_fraction"] == 1.0 and s["wall_s"]["total"] == 200.0
    assert s["instrument_time_s"]["total"] is None
    crit = s["criteria"]
    assert crit["spins found >= 95 %"] and crit["no sample ended in an error"]
    assert not crit["1-sigma coverage 60-76 % per axis"]
    assert not crit["2-sigma coverage 90-98 % per axis"]
    honest = summarise([_sample_with_errors(np.r_[np.full(68, 0.5), np.full(27, 1.5),
                                                  np.full(5, 2.5)])])
    assert honest["criteria"]["1-sigma coverage 60-76 % per axis"]
    assert honest["criteria"]["2-sigma coverage 90-98 % per axis"]


def test_summary_counts_errors_spurious_and_missed():
    error = grade_sample(TWO, 1, None, "Traceback\nRuntimeError: boom")
    spurious = grade_sample(Truth(seed=6, kind="empty", depth_nm=8.0), 0,
                            {"spins": [spin(1, 1, 1)], "layers": [layer(8.0, 0.2)]})
    s = summarise([error, spurious])
    assert (s["errors"], s["passed"], s["spins_missed"], s["spins_spurious"],
            s["layers_spurious"]) == (1, 0, 2, 1, 1)
    assert s["spins_found_fraction"] == 0.0
    assert not s["criteria"]["no sample ended in an error"]
    assert not s["criteria"]["spurious spins + layers <= 1"]
    assert all(math.isnan(v) is False for v in (s["wall_s"]["total"],))
    text = table([error, spurious], s)
    assert "seed 0 (pair): RuntimeError: boom" in text
    assert "spurious layer (height 8.00 nm)" in text and "n/a" in text


def test_validate_subcommand_arguments():
    args = build_parser().parse_args(["validate", "--seeds", "3", "--jobs", "2", "--json"])
    assert (args.seeds, args.jobs, args.json, args.start) == (3, 2, True, 0)
    assert args.func.__name__ == "_validate"


# ---------------------------------------------------------------- runner (a stand-in command)

FAKE_DEMO = """#!{python}
import json, sys, time
args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
assert sys.argv[1] == "demo" and sorted(args) == ["--out", "--scenario"], sys.argv
mode = {mode!r}
if mode == "fail":
    print("== sample x: calibration", file=sys.stderr)
    sys.exit("nvmri demo: error: frequency lock lost near 5.5 GHz")
if mode == "hang":
    time.sleep(60)
scenario = json.load(open(args["--scenario"]))
depth = scenario["nv"]["depth_nm"]
q = lambda v: {{"value": v, "sigma": 0.05}}
spins = [{{"dx_nm": q(p["x_nm"]), "dy_nm": q(p["y_nm"]), "dz_nm": q(p["z_nm"] + depth)}}
         for p in scenario["dark_spins"]["points"]]
import pathlib
out = pathlib.Path(args["--out"]); out.mkdir()
(out / "report.json").write_text(json.dumps({{"spins": spins, "layers": [],
                                               "instrument_time_s": 12.5}}))
"""


def _fake_demo(tmp_path, mode):
    import sys

    path = tmp_path / f"nvmri-{mode}"
    path.write_text(FAKE_DEMO.format(python=sys.executable, mode=mode))
    path.chmod(0o755)
    return str(path)


def test_run_sample_writes_the_scenario_runs_the_command_and_grades(tmp_path):
    truth = draw_sample(4)                                # a pair, no layer
    g = run_sample(truth, tmp_path, command=_fake_demo(tmp_path, "ok"))
    assert g["status"] == "pass" and g["returncode"] == 0 and g["spins_found"] == 2
    assert g["instrument_time_s"] == 12.5 and g["wall_s"] >= 0
    here = tmp_path / "seed-0004"
    assert json.loads((here / "scenario.json").read_text()) == truth.scenario()
    assert json.loads((here / "grade.json").read_text())["status"] == "pass"


def test_run_sample_reports_a_failed_demo_by_its_last_stderr_line(tmp_path):
    g = run_sample(draw_sample(0), tmp_path, command=_fake_demo(tmp_path, "fail"))
    assert g["status"] == "error" and g["returncode"] == 1
    assert g["causes"] == ["nvmri demo: error: frequency lock lost near 5.5 GHz"]


def test_run_sample_stops_a_demo_that_runs_out_of_time(tmp_path):
    g = run_sample(draw_sample(0), tmp_path, timeout_s=1.0,
                            command=_fake_demo(tmp_path, "hang"))
    assert g["status"] == "error" and g["returncode"] is None
    assert g["causes"] == ["timed out after 1 s (stopped)"]
