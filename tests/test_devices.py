"""The ophyd devices against the simulated IOC subprocess, through real bluesky plans.

Physics is checked end to end: scenario -> IOC -> Channel Access -> ophyd ->
RunEngine documents, compared with :mod:`nvmri_bluesky.physics` evaluated
here from the scenario's truth (allowed in tests only).
"""

from __future__ import annotations

import json
import time
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from scipy.optimize import curve_fit

from nvmri_bluesky import physics, pulses
from nvmri_bluesky.devices import LimitExceeded, StageLimitError, make_devices
from nvmri_bluesky.errors import NvmriError

SHOTS = 20_000
"""Shots per CW gate: 0.3 counts/shot, so a 15 % dip is ~12 sigma deep."""


def _events(docs: list[tuple[str, dict]]) -> list[dict]:
    return [doc for name, doc in docs if name == "event"]


def _descriptor(docs: list[tuple[str, dict]]) -> dict:
    return next(doc for name, doc in docs if name == "descriptor")


def _cw_setup(devices: Any, shots: int = SHOTS, detunings: tuple[float, ...] = (0.0,)) -> Any:
    """Plan: CW-ODMR program, shots, MW on, RF off."""
    devices.pulser.load(pulses.cw_odmr(detunings))
    yield from bps.mv(devices.pulser.shots, shots)
    yield from bps.mv(devices.mw.output, "On", devices.rf.output, "Off")


def _apex(ioc: Any, devices: Any) -> np.ndarray:
    drift = np.asarray(ioc.scenario.tip.drift_nm_per_s)
    assert not drift.any(), "these tests assume a drift-free scenario"
    return np.array(devices.stage.position, float)


def _lorentz_dip(f: np.ndarray, a: float, depth: float, f0: float, fwhm: float) -> np.ndarray:
    return a * (1.0 - depth / (1.0 + (2.0 * (f - f0) / fwhm) ** 2))


# ---------------------------------------------------------------- data keys


def test_every_data_key_has_units(devices: Any) -> None:
    devices.pulser.load(pulses.cw_odmr((0.0, 1e6, 2e6)))
    for device in devices.all():
        for key, desc in {**device.describe(), **device.describe_configuration()}.items():
            assert isinstance(desc.get("units"), str), f"{key} has no units: {desc}"
    desc = devices.counter.describe()
    assert desc["counter_counts"]["units"] == "counts"
    assert desc["counter_counts"]["dtype"] == "array"
    assert desc["counter_counts"]["shape"] == [3]
    assert devices.stage.describe()["stage_z"]["units"] == "nm"
    assert devices.mw.describe()["mw_frequency"]["units"] == "Hz"
    assert devices.mw.describe_configuration()["mw_power"]["units"] == "dBm"
    assert {"stage_x", "stage_y", "stage_z"} <= set(devices.stage.describe())


def test_count_emits_fresh_counts_per_gate(devices: Any, RE: Any, collect: Any) -> None:
    RE(_cw_setup(devices, shots=1000, detunings=(0.0, 5e6)))
    docs = collect(bp.count([devices.counter], num=5))
    events = _events(docs)
    ids = [ev["data"]["counter_acq_id"] for ev in events]
    assert np.all(np.diff(ids) == 1), ids          # one acquisition per trigger, none stale
    for ev in events:
        counts = np.asarray(ev["data"]["counter_counts"])
        assert counts.shape == (2,)
    assert _descriptor(docs)["data_keys"]["counter_counts"]["shape"] == [2]
    config = _descriptor(docs)["configuration"]["counter"]["data"]
    assert json.loads(config["counter_gates"]) == ["cw_0", "cw_1"]
    assert config["counter_shots"] == 1000


def test_single_gate_counts_stay_an_array(devices: Any) -> None:
    devices.pulser.load(pulses.cw_odmr((0.0,)))
    devices.counter.trigger().wait(10)
    value = devices.counter.read()["counter_counts"]["value"]
    assert isinstance(value, np.ndarray) and value.shape == (1,)


def test_read_after_trigger_needs_no_ca_round_trip(devices: Any, monkeypatch: Any) -> None:
    import epics.ca

    devices.pulser.load(pulses.cw_odmr((0.0, 1e6)))
    calls = []
    for name in ("get", "get_with_metadata", "get_complete", "get_complete_with_metadata"):
        real = getattr(epics.ca, name)
        monkeypatch.setattr(epics.ca, name,
                            lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    for _ in range(20):
        before = devices.counter.acq_id.get()
        devices.counter.trigger().wait(10)
        reading = devices.counter.read()
        assert reading["counter_acq_id"]["value"] == before + 1
    assert calls == []
    monkeypatch.undo()
    fresh = devices.counter.counts.get(use_monitor=False)
    np.testing.assert_array_equal(reading["counter_counts"]["value"], fresh)


def test_source_set_waits_for_readback(devices: Any) -> None:
    for f in (2.95e9, 2.95e9 + 1.0, 3.1e9):
        devices.mw.frequency.set(f).wait(5)
        assert devices.mw.frequency.read()["mw_frequency"]["value"] == f
    devices.rf.power.set(-3.5).wait(5)
    assert devices.rf.power.get() == -3.5
    devices.mw.output.set("On").wait(5)
    assert devices.mw.output.get() == 1
    devices.mw.output.set(0).wait(5)
    assert devices.mw.output.get() == 0
    with pytest.raises(LimitExceeded, match="mw_frequency"):
        devices.mw.frequency.set(1e12)
    assert devices.mw.frequency.get() == 3.1e9


def test_real_time_moves_and_acquisitions_complete_with_fresh_data(make_ioc: Any,
                                                                   RE: Any, collect: Any) -> None:
    _, devices = make_ioc("paper-fig2", time_scale=1.0)          # real durations
    RE(_cw_setup(devices, shots=20_000))                           # 60 ms per acquisition
    t0 = time.monotonic()
    RE(bps.mv(devices.stage.z, 150.0))                             # 50 nm at 1000 nm/s
    assert time.monotonic() - t0 >= 0.05
    assert devices.stage.z.user_readback.get(use_monitor=False) == 150.0
    t0 = time.monotonic()
    docs = collect(bp.count([devices.counter], num=3))
    assert time.monotonic() - t0 >= 3 * 0.06
    ids = [ev["data"]["counter_acq_id"] for ev in _events(docs)]
    assert np.all(np.diff(ids) == 1)


# ---------------------------------------------------------------- physics through the chain


def test_odmr_dip_at_physics_f_nv(ioc: Any, devices: Any, RE: Any, collect: Any) -> None:
    inst = ioc.scenario.instrument()
    RE(bps.mv(devices.stage.x, 10.0, devices.stage.y, -20.0, devices.stage.z, 50.0))
    f_nv = float(inst.f_nv(_apex(ioc, devices)))
    fwhm = 1.0 / inst.tau_cw_s                                  # 8.3 MHz
    RE(_cw_setup(devices))
    start, stop = f_nv - 3.1 * fwhm, f_nv + 2.3 * fwhm          # deliberately off-centre
    docs = collect(bp.scan([devices.counter], devices.mw.frequency, start, stop, 61))
    events = _events(docs)
    freq = np.array([ev["data"]["mw_frequency"] for ev in events])
    counts = np.array([ev["data"]["counter_counts"][0] for ev in events])
    np.testing.assert_allclose(freq, np.linspace(start, stop, 61), rtol=0, atol=1e-3)
    assert np.all(np.diff([ev["data"]["counter_acq_id"] for ev in events]) == 1)
    p0 = (counts.max(), 0.1, freq[np.argmin(counts)], fwhm)
    (a, depth, f0, width), _ = curve_fit(_lorentz_dip, freq, counts, p0=p0,
                                         sigma=np.sqrt(counts), absolute_sigma=True)
    assert abs(f0 - f_nv) < 0.1 * fwhm, (f0 - f_nv) / fwhm
    assert width == pytest.approx(fwhm, rel=0.2)
    assert depth == pytest.approx(inst.contrast_cw, rel=0.2)
    assert a == pytest.approx(SHOTS * inst.cw_count_rate_hz * pulses.CW_WINDOW_S, rel=0.02)
    shift = f_nv - inst.f_nv0                                   # the tip really moved the line
    assert abs(shift) > 5 * fwhm


def test_counts_follow_tip_height(ioc: Any, devices: Any, RE: Any, collect: Any) -> None:
    inst = ioc.scenario.instrument()
    RE(bps.mv(devices.stage.x, 0.0, devices.stage.y, 0.0, devices.stage.z, 60.0))
    f_mw = float(inst.f_nv(_apex(ioc, devices)))                # resonant at z = 60 nm
    RE(_cw_setup(devices))
    RE(bps.mv(devices.mw.frequency, f_mw))
    heights = [30.0, 45.0, 55.0, 58.0, 60.0, 62.0, 65.0, 75.0, 100.0, 200.0]
    docs = collect(bp.list_scan([devices.counter], devices.stage.z, heights))
    events = _events(docs)
    z = np.array([ev["data"]["stage_z"] for ev in events])
    counts = np.array([ev["data"]["counter_counts"][0] for ev in events])
    np.testing.assert_allclose(z, heights)
    apex = np.column_stack([np.zeros_like(z), np.zeros_like(z), z])
    expected = physics.cw_counts(f_mw, inst.f_nv(apex), SHOTS, pulses.CW_WINDOW_S,
                                 inst.cw_count_rate_hz, inst.tau_cw_s, inst.contrast_cw)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (counts, expected)
    assert heights[int(np.argmin(counts))] == pytest.approx(60.0, abs=3.0)
    assert counts[-1] > counts[heights.index(60.0)] + 10 * np.sqrt(expected.max())


# ---------------------------------------------------------------- faults


def test_move_below_z_min_is_refused_and_nothing_moves(ioc: Any, devices: Any,
                                                       RE: Any) -> None:
    z = devices.stage.z
    RE(bps.mv(z, 40.0))
    z_min = ioc.scenario.z_min_nm
    assert z.limits[0] == pytest.approx(z_min)
    with pytest.raises(StageLimitError, match="z_min"):
        RE(bps.mv(z, z_min - 1.0))
    assert isinstance(StageLimitError("x"), NvmriError)
    assert z.user_readback.get(use_monitor=False) == 40.0
    assert z.user_setpoint.get(use_monitor=False) == 40.0
    # the IOC refuses it too when a client bypasses the soft limit
    z.user_setpoint.put(z_min - 1.0, force=True, wait=True, timeout=5)
    time.sleep(0.2)
    assert z.user_readback.get(use_monitor=False) == 40.0
    assert z.motor_done_move.get(use_monitor=False) == 1


def test_out_of_range_xy_and_non_numbers_are_refused(devices: Any) -> None:
    with pytest.raises(StageLimitError, match="above the high limit"):
        devices.stage.x.set(1e6)
    with pytest.raises(StageLimitError, match="not finite"):
        devices.stage.y.set(float("nan"))


def test_wrong_prefix_fails_fast(ioc: Any) -> None:
    t0 = time.monotonic()
    with pytest.raises(NvmriError) as err:
        make_devices("NOSUCH_INSTRUMENT:", connection_timeout=2.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0
    message = str(err.value)
    assert "\n" not in message and "NOSUCH_INSTRUMENT:" in message
    assert "no IOC answers" in message


def test_stopped_ioc_fails_fast(make_ioc: Any, RE: Any) -> None:
    handle, devices = make_ioc("paper-fig2")
    RE(_cw_setup(devices, shots=100))
    devices.counter.trigger().wait(10)
    handle.stop()
    t0 = time.monotonic()
    with pytest.raises(NvmriError, match="IOC stopped"):
        devices.counter.trigger()
    with pytest.raises(NvmriError):
        devices.stage.x.set(1.0)
    with pytest.raises(NvmriError) as err:
        make_devices(handle.prefix, connection_timeout=2.0)
    assert "\n" not in str(err.value)
    assert time.monotonic() - t0 < 5.0


def test_ioc_dying_mid_acquisition_fails_the_trigger(make_ioc: Any) -> None:
    scenario = {"name": "pause", "dark_spins": {"points": [], "layers": []},
                "faults": [{"kind": "ioc_pause", "after_acquisitions": 1, "seconds": 30.0}]}
    handle, devices = make_ioc(scenario)
    devices.pulser.load(pulses.cw_odmr())
    devices.counter.trigger().wait(10)                 # acquisition 0
    status = devices.counter.trigger()                 # acquisition 1 stalls for 30 s
    time.sleep(0.5)
    assert not status.done
    t0 = time.monotonic()
    handle.stop()
    with pytest.raises(NvmriError, match="lost the connection"):
        status.wait(10)
    assert time.monotonic() - t0 < 5.0


def test_acquisition_without_a_program_is_refused_at_once(make_ioc: Any) -> None:
    _, devices = make_ioc("paper-fig2")
    t0 = time.monotonic()
    with pytest.raises(NvmriError, match="refused the acquisition: no pulse program"):
        devices.counter.trigger().wait(10)
    assert time.monotonic() - t0 < 1.0


def test_malformed_program_is_refused_with_the_iocs_message(devices: Any, RE: Any) -> None:
    good = pulses.cw_odmr()
    devices.pulser.load(good)
    bad = good.to_dict()
    bad["gates"][0]["pulses"][0]["channel"] = "bogus"
    with pytest.raises(NvmriError, match="pulser refused program 'cw_odmr'.*bogus"):
        devices.pulser.load(bad)
    assert devices.pulser.state.get(use_monitor=False) == "Error"
    message = devices.pulser.message.get(use_monitor=False)
    assert "bogus" in message and "\n" not in message
    with pytest.raises(NvmriError, match="refused.*JSON"):
        devices.pulser.load("{not json")
    with pytest.raises(Exception) as err:                     # the same inside a plan
        RE(bps.mv(devices.pulser, bad))
    chain = [err.value, err.value.__cause__, err.value.__context__]
    assert any(isinstance(e, NvmriError) and "bogus" in str(e) for e in chain), chain
    assert devices.pulser.load(good) == ["cw_0"]              # and it recovers
    assert devices.pulser.message.get(use_monitor=False) == "OK"
