"""`nvmri demo` end to end on scenario files with a spin placed at random.

Each test writes a scenario file (a seeded random spin within |dx|, |dy| <= 8
nm and -6 <= dz <= 2 nm of an NV 6..16 nm deep, coupled by >= 50 kHz), runs
the real command in a subprocess (its own simulated IOC, embedded catalog and
Channel Access port) with the single-spin protocol of the default demo
(``--quick`` only halves the tip-free spectrum's points), and grades
report.json against the truth, which only the test knows.  A fixed
two-spin scenario checks that both spins of a pair are found.
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

pytestmark = pytest.mark.timeout(1500)


def random_spin_scenario(seed: int) -> tuple[dict, np.ndarray]:
    """A scenario with one random spin (and its offset from the NV, nm)."""
    rng = np.random.default_rng(seed)
    axis = physics.Instrument().nv_axis
    while True:
        depth = rng.uniform(6.0, 16.0)
        offset = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-6, 2)])
        if (-depth + offset[2] < -0.5 and np.linalg.norm(offset) > 2.0
                and abs(physics.dipolar_coupling(offset, axis)) >= 50e3):
            break
    spin = offset + np.array([0.0, 0.0, -depth])
    scenario = {"name": f"random-spin-{seed}", "seed": seed, "nv": {"depth_nm": float(depth)},
                "dark_spins": {"points": [{"x_nm": float(spin[0]), "y_nm": float(spin[1]),
                                           "z_nm": float(spin[2])}]}}
    return scenario, offset


def _run_demo(tmp_path: Path, scenario: dict) -> dict:
    """``nvmri demo --scenario FILE --steps spins --quick`` in a subprocess; its report."""
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-m", "nvmri_bluesky.cli", "demo", "--scenario", str(path),
         "--steps", "spins", "--quick", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(out.glob("fig4_spins_*.png"))
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("seed", [11, 23, 37])
def test_demo_finds_a_random_spin(tmp_path: Path, seed: int) -> None:
    scenario, truth = random_spin_scenario(seed)
    report = _run_demo(tmp_path, scenario)
    assert len(report["spins"]) >= 1, report
    spin = report["spins"][0]
    for k, axis in enumerate(("dx_nm", "dy_nm", "dz_nm")):
        value, sigma = spin[axis]["value"], spin[axis]["sigma"]
        error = abs(value - truth[k])
        assert error <= 0.3, (axis, value, truth[k], sigma)
        assert error <= 3 * sigma, (axis, value, truth[k], sigma)
        assert sigma <= 0.5
    # every run it used is in the catalog
    assert set(report["runs"]) >= {f"{scenario['name']}/{m}" for m in
                                   ("psf_map", "deer_evolution", "deer_spectrum", "deer_survey",
                                    "deer_raster")}


def test_demo_finds_two_spins(tmp_path: Path) -> None:
    """Two spins 11 nm apart with comparable couplings (117 and 176 kHz): both found."""
    truth = np.array([[4.0, 5.1, -3.65], [2.0, -6.0, -2.0]])          # offsets from the NV
    depth = 10.0
    scenario = {"name": "two-spins", "seed": 6, "nv": {"depth_nm": depth},
                "dark_spins": {"points": [{"x_nm": x, "y_nm": y, "z_nm": z - depth}
                                          for x, y, z in truth]}}
    report = _run_demo(tmp_path, scenario)
    assert len(report["spins"]) == 2, report["spins"]
    found = np.array([[s[k]["value"] for k in ("dx_nm", "dy_nm", "dz_nm")]
                      for s in report["spins"]])
    sigma = np.array([[s[k]["sigma"] for k in ("dx_nm", "dy_nm", "dz_nm")]
                      for s in report["spins"]])
    order = [int(np.argmin(np.linalg.norm(found - t, axis=1))) for t in truth]
    assert sorted(order) == [0, 1]
    error = np.abs(found[order] - truth)
    assert np.all(error <= 0.3), (found, truth)
    assert np.all(error <= 3 * sigma[order]), (found, truth, sigma)
