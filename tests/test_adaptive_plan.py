"""The adaptive single-spin protocol (issue 15) through the simulated IOC.

A random spin (seeded) in its own IOC; the plan sees only Channel Access.  The
test grades the result with the scenario's truth and re-reconstructs the
stored documents alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import reconstruct_synth as syn

from nvmri_bluesky.reconstruct.runs import run_dataset

SEED = 1507


def _scenario() -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(SEED)
    depth = float(rng.uniform(8.0, 14.0))
    spin = syn.random_spin(rng, syn.instrument(depth), min_coupling_hz=80e3)
    return ({"name": "adaptive-random", "seed": SEED, "nv": {"depth_nm": depth},
             "dark_spins": {"points": [{"x_nm": float(spin[0]), "y_nm": float(spin[1]),
                                        "z_nm": float(spin[2] - depth)}]}}, spin)


def _runs(docs: list[tuple[str, dict]]) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    current: dict = {}
    for name, doc in docs:
        if name == "start":
            current = {"start": doc, "events": [], "primary": None, "stop": None}
            runs[doc.get("measurement", doc["uid"])] = current
        elif name == "descriptor" and doc.get("name") == "primary":
            current["primary"] = doc["uid"]
        elif name == "event" and doc["descriptor"] == current["primary"]:
            current["events"].append(doc)
        elif name == "stop":
            current["stop"] = doc
    return runs


@pytest.mark.timeout(900)
def test_adaptive_run_localises_a_random_spin(make_ioc: Any) -> None:
    from bluesky import RunEngine

    from nvmri_bluesky.plans.accounting import InstrumentClock
    from nvmri_bluesky.plans.adaptive import adaptive_spin
    from nvmri_bluesky.reconstruct.adaptive import concat_points
    from nvmri_bluesky.reconstruct.detuning import (
        DetuningInterpolant,
        dark_detuning_map,
        dark_detuning_sigma,
    )
    from nvmri_bluesky.reconstruct.lines import fit_deer_spectrum
    from nvmri_bluesky.reconstruct.localize import localize_spins

    scenario, spin = _scenario()
    _, nv = make_ioc(scenario)
    RE = RunEngine({}, call_returns_result=True)
    InstrumentClock(nv).attach(RE)
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    # a quick survey (20k shots): the adaptive points must bring the target
    uids = RE(adaptive_spin(nv, quick=True, survey_shots=20_000, budget_s=3600.0)).plan_result
    runs = _runs(docs)
    batches = sorted((m for m in uids if m.startswith("deer_adaptive_")),
                     key=lambda m: int(m.rsplit("_", 1)[1]))
    assert batches, "the survey alone met the target: the test needs adaptive points"
    stop = runs["adaptive_stop"]["start"]
    assert stop["reason"] == "target reached", stop
    # every decision is in the documents
    spent = 0.0
    for m in batches:
        start, events = runs[m]["start"], runs[m]["events"]
        decision = start["adaptive"]
        assert len(events) == len(start["plan_args"]["tips_nm"]) == len(decision["shots"])
        assert decision["spent_s"] == pytest.approx(spent)
        assert np.all(np.asarray(decision["predicted_sigma_nm"])
                      < np.asarray(decision["fit_sigma_nm"]))
        measured = sorted((e["data"]["stage_x_user_setpoint"], e["data"]["stage_y_user_setpoint"],
                           e["data"]["stage_z_user_setpoint"], e["data"]["pulser_shots"])
                          for e in events)
        planned = sorted((*np.round(t, 6), s) for t, s in zip(
            start["plan_args"]["tips_nm"], start["plan_args"]["shots"], strict=True))
        np.testing.assert_allclose(measured, planned, atol=1e-6)
        spent += runs[m]["stop"]["instrument_time_s"]
    assert stop["spent_s"] == pytest.approx(spent)
    # the stored documents alone: the same fit, within 3 sigma of the truth
    data = {m: run_dataset(r["start"], r["events"], r["stop"]) for m, r in runs.items()
            if m in ("psf_map", "deer_spectrum", "deer_survey", *batches)}
    det = DetuningInterpolant.from_map(dark_detuning_map(data["psf_map"]),
                                       dark_detuning_sigma(data["psf_map"]))
    _, line = fit_deer_spectrum(data["deer_spectrum"])
    points = concat_points([data[m] for m in batches])
    assert points.sizes["point"] == sum(len(runs[m]["events"]) for m in batches)
    fit = localize_spins([data["deer_survey"], points], det, line)
    assert len(fit.spins) == 1
    s = fit.spins[0]
    np.testing.assert_allclose(s.offset_nm, stop["fit_offset_nm"], atol=1e-6)
    np.testing.assert_allclose(s.offset_sigma_nm, stop["fit_sigma_nm"], rtol=1e-6)
    assert np.all(s.offset_sigma_nm <= [0.3, 0.3, 0.05])
    err = s.offset_nm - spin
    assert np.all(np.abs(err) <= 3.0 * s.offset_sigma_nm), (spin, err, s.offset_sigma_nm)


def test_demo_adaptive_swaps_the_single_spin_step() -> None:
    from nvmri_bluesky.demo import _samples

    paper = dict(_samples(None, None, None, adaptive=True))
    assert paper["paper-fig4"] == ("adaptive",)
    assert paper["paper-fig3-nv1"] == ("sample",)            # layers: the fixed protocol
    assert dict(_samples(None, None, None))["paper-fig4"] == ("sample",)
    assert _samples("x.json", None, None, adaptive=True) == [("x.json",
                                                              ("calibration", "adaptive"))]
    assert _samples("x.json", None, ("spins",), adaptive=True) == [("x.json", ("adaptive",))]


@pytest.mark.timeout(1800)
def test_demo_adaptive_reports_a_random_spin_from_the_catalog(tmp_path: Any) -> None:
    """``nvmri demo --scenario FILE --adaptive --quick --steps adaptive`` in a subprocess:
    the report (reconstructed from the catalog, adaptive points included) has the spin
    within 3 sigma and 0.3 nm of the truth, at the target sigma."""
    import json
    import os
    import subprocess
    import sys

    from services import run_demo

    scenario, spin = _scenario()
    proc, out = run_demo(tmp_path, scenario, "--adaptive", "--quick", "--steps", "adaptive",
                         "--jobs", "1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    runs = {k.split("/", 1)[1] for k in report["runs"]}
    assert {"psf_map", "deer_evolution", "deer_spectrum", "deer_survey", "adaptive_stop"} <= runs
    assert not runs & {"deer_raster", "deer_zoom"}
    assert len(report["spins"]) == 1
    entry = report["spins"][0]
    for i, (axis, target) in enumerate(zip(("dx_nm", "dy_nm", "dz_nm"), (0.3, 0.3, 0.05),
                                           strict=True)):
        q = entry[axis]
        assert abs(q["value"] - spin[i]) <= min(3 * q["sigma"], 0.3), (axis, q, spin)
        assert q["sigma"] <= target * 1.0001
    if any(r.startswith("deer_adaptive_") for r in runs):
        assert (out / f"fig4_adaptive_{scenario['name']}.png").is_file()
    # `nvmri reconstruct` of the stop run: the same spin from the catalog
    stop_uid = report["runs"][f"{scenario['name']}/adaptive_stop"]
    proc = subprocess.run([sys.executable, "-m", "nvmri_bluesky.cli", "reconstruct", stop_uid,
                           "--catalog", str(out / "catalog"), "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(proc.stdout)
    assert len(again["spins"]) == 1
    for axis in ("dx_nm", "dy_nm", "dz_nm"):
        assert again["spins"][0][axis]["value"] == pytest.approx(entry[axis]["value"], abs=1e-6)


def test_survey_repeats_reach_the_fixed_survey_shots_in_steps() -> None:
    from nvmri_bluesky.plans.adaptive import _more_survey_shots

    assert _more_survey_shots(20_000, 200_000) == [40_000, 140_000]
    assert _more_survey_shots(50_000, 200_000) == [150_000]
    assert _more_survey_shots(200_000, 200_000) == []
    for first in (5_000, 10_000, 20_000, 70_000):
        steps = _more_survey_shots(first, 200_000)
        assert first + sum(steps) == 200_000 and all(s > 0 for s in steps)
