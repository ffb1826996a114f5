"""Scenario schema: defaults, built-ins, JSON/YAML, one-line validation errors."""

import json

import numpy as np
import pytest

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.sim.scenario import Scenario, list_scenarios, load_scenario


def test_defaults_are_the_physics_defaults():
    s = Scenario.from_dict({})
    assert s.instrument() == physics.Instrument()
    assert s.z_min_nm == physics.Z_MIN_NM
    assert s.spin_positions().shape == (0, 3)


def test_builtins_load():
    names = list_scenarios()
    assert {"default", "paper-fig2", "paper-fig3-nv1", "paper-fig3-nv2",
            "paper-fig4"} <= set(names)
    for name in names:
        assert isinstance(load_scenario(name), Scenario)
    assert load_scenario("default") == load_scenario("paper-fig4")
    assert load_scenario(None).name == "paper-fig4"


def test_paper_scenarios():
    fig3 = load_scenario("paper-fig3-nv1")
    spins = fig3.spin_positions()
    assert len(spins) == round(0.5 * np.pi * 40.0**2)
    assert np.all(spins[:, 2] == 0.0)
    assert np.hypot(spins[:, 0], spins[:, 1]).max() <= 40.0
    np.testing.assert_array_equal(spins, fig3.spin_positions())       # seeded
    assert load_scenario("paper-fig3-nv2").nv.depth_nm == 14.0

    fig4 = load_scenario("paper-fig4")
    inst = fig4.instrument()
    offsets = fig4.spin_positions() - inst.nv_position_nm
    np.testing.assert_allclose(offsets[0], [4.0, 5.1, -3.65])
    assert np.all(np.linalg.norm(offsets[1:], axis=1) > 15.0)
    nu = np.abs(physics.dipolar_coupling(offsets, inst.nv_axis))
    assert nu[0] > 20 * nu[1:].max()                   # the background barely couples


def test_json_and_yaml_files(tmp_path):
    doc = {"name": "mine", "seed": 3, "nv": {"depth_nm": 12.0},
           "dark_spins": {"points": [{"x_nm": 1.0, "y_nm": 2.0, "z_nm": -1.0}]},
           "faults": [{"kind": "counter_dropout", "after_acquisitions": 2, "count": 3}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "b.yaml").write_text(
        "name: mine\nseed: 3\nnv: {depth_nm: 12.0}\n"
        "dark_spins:\n  points:\n    - {x_nm: 1.0, y_nm: 2.0, z_nm: -1.0}\n"
        "faults:\n  - {kind: counter_dropout, after_acquisitions: 2, count: 3}\n")
    a, b = load_scenario(tmp_path / "a.json"), load_scenario(str(tmp_path / "b.yaml"))
    assert a == b
    assert a.faults[0].count == 3
    assert a.instrument().nv_depth_nm == 12.0
    (tmp_path / "c.yml").write_text("{}\n")
    assert load_scenario(tmp_path / "c.yml").name == "c"


def test_to_dict_round_trips():
    for name in list_scenarios():
        s = load_scenario(name)
        d = s.to_dict()
        json.dumps(d)
        assert Scenario.from_dict(d) == s


BAD = [
    ({"foo": 1}, "foo: unknown key"),
    ({"dark_spins": {"points": [{"x_nm": 0, "y_nm": 0, "z_nm": -1, "q_nm": 1}]}},
     "dark_spins.points[0].q_nm: unknown key"),
    ({"dark_spins": {"points": [{"x_nm": 0, "y_nm": 0}]}}, "dark_spins.points[0].z_nm: missing"),
    ({"nv": {"depth_nm": 0}}, "nv.depth_nm: must be > 0"),
    ({"nv": {"depth_nm": -3}}, "nv.depth_nm: must be > 0"),
    ({"dark_spins": {"points": [{"x_nm": 0, "y_nm": 0, "z_nm": 1.5}]}},
     "dark_spins.points[0].z_nm: 1.5 is above the surface"),
    ({"dark_spins": {"layers": [{"z_nm": 2.0}]}}, "dark_spins.layers[0].z_nm: 2.0 is above"),
    ({"dark_spins": {"points": [{"x_nm": 0, "y_nm": 0, "z_nm": -10}]}},
     "dark_spins.points[0]: is within 0.5 nm of the NV"),
    ({"tip": {"moment_am2": 0}}, "tip.moment_am2: must be > 0"),
    ({"tip": {"moment_am2": -1e-17}}, "tip.moment_am2: must be > 0"),
    ({"dark_spins": {"layers": [{"density_per_nm2": -0.1}]}},
     "dark_spins.layers[0].density_per_nm2: must be >= 0"),
    ({"nv": {"depth_nm": "deep"}}, "nv.depth_nm: expected a number, got a string"),
    ({"nv": {"depth_nm": True}}, "nv.depth_nm: expected a number"),
    ({"seed": 1.5}, "seed: expected an integer"),
    ({"nv": {"axis_deg": [54.7]}}, "nv.axis_deg: expected 2 numbers"),
    ({"tip": {"drift_nm_per_s": "fast"}}, "tip.drift_nm_per_s: expected a list"),
    ({"nv": {"contrast": 1.2}}, "nv.contrast: must be between 0 and 1"),
    ({"nv": []}, "nv: expected an object"),
    ({"faults": [{"kind": "meteor"}]}, "faults[0].kind: unknown fault kind 'meteor'"),
    ({"faults": [{"kind": "counter_dropout", "hz": 1.0}]},
     "faults[0].hz: unknown key for fault kind 'counter_dropout'"),
    ({"faults": [{"kind": "ioc_pause", "seconds": -1}]}, "faults[0].seconds: must be >= 0"),
    ({"stage": {"start_nm": [0, 0, 2]}}, "stage.start_nm"),
    ({"z_min_nm": 0}, "z_min_nm: must be > 0"),
]


@pytest.mark.parametrize(("doc", "message"), BAD)
def test_bad_scenarios_give_one_line(doc, message):
    with pytest.raises(NvmriError) as info:
        Scenario.from_dict(doc)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_bad_files_and_names(tmp_path):
    with pytest.raises(NvmriError, match="unknown scenario 'nope'"):
        load_scenario("nope")
    with pytest.raises(NvmriError, match="cannot read scenario file"):
        load_scenario(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NvmriError, match="not valid JSON"):
        load_scenario(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(NvmriError, match="not valid YAML") as info:
        load_scenario(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "key.json").write_text('{"nv": {"depht_nm": 3}}')
    with pytest.raises(NvmriError, match=r"key.json: nv.depht_nm: unknown key"):
        load_scenario(tmp_path / "key.json")
