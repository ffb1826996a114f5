"""`nvmri demo --scenario FILE --out DIR` end to end, with no other option, on any sample.

Each test writes a scenario file drawn from the envelope of issue #11 (point
spins within |dx|, |dy| <= 8 nm and -6 <= dz <= 2 nm of an NV 6..16 nm deep,
coupled by >= 50 kHz, >= 3 nm apart; layers of 0.1-1 spins/nm^2 at the
surface), runs the real command in a subprocess (its own simulated IOC,
embedded catalog and Channel Access port; the default protocol decides from
the data what the sample holds), and grades report.json against the truth,
which only the test knows: offsets within 3 sigma and 0.3 nm per axis,
sigmas <= 0.5 nm, layer heights within 1 nm, densities within 30 %, no
spurious spin or layer.  The seeds are the tests' own (the first ones tried).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nvmri_bluesky import physics

pytestmark = pytest.mark.timeout(3000)
XDIST_PER_TEST = True  # independent `nvmri demo` runs: spread over the test workers

AXES = ("dx_nm", "dy_nm", "dz_nm")


def _random_offset(rng: np.random.Generator, depth: float, others: list[np.ndarray]
                   ) -> np.ndarray:
    """A spin offset inside the envelope (and the diamond), >= 3 nm from ``others``."""
    axis = physics.Instrument().nv_axis
    while True:
        offset = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-6, 2)])
        if (-depth + offset[2] < -0.5 and np.linalg.norm(offset) > 2.0
                and abs(physics.dipolar_coupling(offset, axis)) >= 50e3
                and all(np.linalg.norm(offset - o) >= 3.0 for o in others)):
            return offset


def random_sample(seed: int, n_spins: int, layer: bool, depth_nm: tuple[float, float]
                  = (6.0, 16.0)) -> tuple[dict, np.ndarray, list[tuple[float, float]]]:
    """A scenario with ``n_spins`` random spins and maybe a surface layer.

    Returns
    -------
    (scenario, spin offsets (n, 3) from the NV in nm, [(layer height above NV nm, density)])
    """
    rng = np.random.default_rng(seed)
    depth = float(rng.uniform(*depth_nm))
    offsets: list[np.ndarray] = []
    for _ in range(n_spins):
        offsets.append(_random_offset(rng, depth, offsets))
    dark: dict = {"points": [{"x_nm": float(o[0]), "y_nm": float(o[1]),
                              "z_nm": float(o[2] - depth)} for o in offsets]}
    layers = []
    if layer:
        density = float(rng.uniform(0.1, 1.0))
        dark["layers"] = [{"z_nm": 0.0, "density_per_nm2": density, "radius_nm": 40.0}]
        layers.append((depth, density))
    scenario = {"name": f"sample-{seed}", "seed": seed, "nv": {"depth_nm": depth},
                "dark_spins": dark}
    return scenario, np.array(offsets).reshape(-1, 3), layers


def run_demo(tmp_path: Path, scenario: dict) -> dict:
    """``nvmri demo --scenario FILE --out DIR`` (no other option) in a subprocess; its report."""
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-m", "nvmri_bluesky.cli", "demo", "--scenario", str(path),
         "--out", str(out)], env=env, capture_output=True, text=True, timeout=2900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "report.json").read_text())


def grade_spins(report: dict, truth: np.ndarray) -> None:
    """Every true spin found once within 3 sigma and 0.3 nm per axis; no spurious spin."""
    spins = report["spins"]
    assert len(spins) == len(truth), (spins, truth)
    if not len(truth):
        return
    for s in spins:
        assert all(s[a]["value"] is not None for a in AXES), s
        assert s["evidence"]["value"] >= s["evidence"]["threshold"], s
    found = np.array([[s[a]["value"] for a in AXES] for s in spins])
    sigma = np.array([[s[a]["sigma"] for a in AXES] for s in spins])
    order = [int(np.argmin(np.linalg.norm(found - t, axis=1))) for t in truth]
    assert sorted(order) == list(range(len(truth))), (found, truth)
    error = np.abs(found[order] - truth)
    assert np.all(error <= 0.3), (found, truth, sigma)
    assert np.all(error <= 3 * sigma[order]), (found, truth, sigma)
    assert np.all(sigma <= 0.5), sigma


def grade_layers(report: dict, truth: list[tuple[float, float]]) -> None:
    """Every true layer found (height within 1 nm, density within 30 %); no spurious layer."""
    layers = report["layers"]
    assert len(layers) == len(truth), (layers, truth)
    for layer, (height, density) in zip(layers, truth, strict=True):
        h, n = layer["height_above_nv_nm"], layer["density_per_nm2"]
        assert h["value"] is not None and n["value"] is not None, layer
        assert abs(h["value"] - height) <= 1.0, (h, height)
        assert abs(n["value"] - density) <= 0.3 * density, (n, density)
        assert layer["evidence"]["value"] >= layer["evidence"]["threshold"], layer


def grade(report: dict, scenario: dict, truth: np.ndarray,
          layers: list[tuple[float, float]]) -> None:
    """The whole sample: spins, layers, unique run names, a detection limit."""
    grade_spins(report, truth)
    grade_layers(report, layers)
    runs = report["runs"]
    assert len(set(runs.values())) == len(runs)             # one uid per measurement name
    assert f"{scenario['name']}/deer_evolution" in runs
    assert report["detection_limit_hz"] is None or report["detection_limit_hz"] > 0


def test_demo_random_single_spin(tmp_path: Path) -> None:
    scenario, truth, layers = random_sample(1101, n_spins=1, layer=False)
    report = run_demo(tmp_path, scenario)
    grade(report, scenario, truth, layers)
    assert report["detection_limit_hz"] <= 50e3
    assert {f"{scenario['name']}/{m}" for m in ("psf_map", "deer_spectrum", "deer_survey")} \
        <= set(report["runs"])
    assert list((tmp_path / "out").glob("fig4_spins_*.png"))


def test_demo_layer_only(tmp_path: Path) -> None:
    scenario, truth, layers = random_sample(1102, n_spins=0, layer=True)
    report = run_demo(tmp_path, scenario)
    grade(report, scenario, truth, layers)
    assert list((tmp_path / "out").glob("fig3_layer_*.png"))


def test_demo_spin_and_layer_on_one_nv(tmp_path: Path) -> None:
    """A spin and a layer on one NV.  NVs 10-16 nm deep: below 10 nm the layer PSF map's
    lowest plane (9 nm) shifts the line beyond the lock's reach on this branch (seed 1103
    with 6-16 nm drew 8.3 nm: "frequency lock lost"; the lock-envelope branch owns that,
    and ``test_demo_shallow_nv`` covers it).  Seed 1103 (NV 11.4 nm, 0.86 spins/nm^2, a
    216 kHz spin) hides the spin from the tip-free evolution: the survey finds it with
    the imaged layer as a background of the joint fit.  The layer's misfit image there
    also gives a -1.16 MHz "spin" near the NV (raster evidence 278), which the tip-free
    evolution contradicts (2 delta log L -589): it must not be reported."""
    scenario, truth, layers = random_sample(1103, n_spins=1, layer=True, depth_nm=(10.0, 16.0))
    report = run_demo(tmp_path, scenario)
    grade(report, scenario, truth, layers)


def test_demo_shallow_nv(tmp_path: Path) -> None:
    """An NV 6-7 nm deep: the tip moves its line by more than a GHz."""
    scenario, truth, layers = random_sample(1104, n_spins=1, layer=False, depth_nm=(6.0, 7.0))
    report = run_demo(tmp_path, scenario)
    grade(report, scenario, truth, layers)
    assert report["not_done"] == [], report["not_done"]          # every step, no lost lock


def test_demo_finds_two_spins(tmp_path: Path) -> None:
    """Two spins 11 nm apart with comparable couplings (117 and 176 kHz): both found."""
    truth = np.array([[4.0, 5.1, -3.65], [2.0, -6.0, -2.0]])          # offsets from the NV
    depth = 10.0
    scenario = {"name": "two-spins", "seed": 6, "nv": {"depth_nm": depth},
                "dark_spins": {"points": [{"x_nm": x, "y_nm": y, "z_nm": z - depth}
                                          for x, y, z in truth]}}
    grade(run_demo(tmp_path, scenario), scenario, truth, [])


def test_demo_a_layer_map_whose_lock_cannot_follow_leaves_the_spin_reported(
        tmp_path: Path) -> None:
    """The spin and layer of ``test_demo_spin_and_layer_on_one_nv``, with the counter
    dropping out for 3 acquisitions on the first plane of the layer's PSF map (its
    acquisitions start at 3337 on this sample): the lock loses the line there, the layer
    runs end with that reason in ``not_done``, and the protocol goes on to the spin
    surveys (the decay now unexplained, for the couplings a layer would hide too): the
    spin is found as without the fault, and no layer is reported."""
    scenario, truth, _ = random_sample(1103, n_spins=1, layer=True, depth_nm=(10.0, 16.0))
    scenario["faults"] = [{"kind": "counter_dropout", "after_acquisitions": 3337 + 60,
                           "count": 3}]
    report = run_demo(tmp_path, scenario)
    grade_spins(report, truth)
    assert report["layers"] == []
    assert [(e["sample"], e["step"]) for e in report["not_done"]] == [("sample-1103",
                                                                         "sample")]
    reason = report["not_done"][0]["reason"]
    assert reason.startswith("layer: ") and "frequency lock lost near" in reason, reason
    assert {f"sample-1103/{m}" for m in ("layer_psf_map", "deer_survey", "deer_raster")} \
        <= set(report["runs"])
    from nvmri_bluesky.catalog import open_catalog

    with open_catalog(str(tmp_path / "out" / "catalog")) as cat:
        stop = cat.run(report["runs"]["sample-1103/layer_psf_map"]).metadata["stop"]
    assert stop["reason"].startswith("map stopped at apex 33 nm"), stop
