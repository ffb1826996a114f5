"""Instrument-time accounting (plans/accounting.py) against runs whose cost is known.

The expected times are computed here from the programs the test builds, the
shots it sets and the velocity it reads: a Rabi sweep (no lock, one
acquisition per point) and a Ramsey line (one stage axis moving).
"""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
import pytest

from nvmri_bluesky import plans, pulses
from nvmri_bluesky.plans.accounting import (
    InstrumentClock,
    instrument_time_s,
    stop_instrument_time_s,
)


def test_formula_sums_shots_times_program_and_travel_over_velocity():
    assert instrument_time_s([1000, 2000], [1e-5, 2e-5]) == pytest.approx(0.05)
    assert instrument_time_s(travel_nm=[10.0, -30.0, 0.0],
                             velocity_nm_per_s=[100.0, 300.0, 0.0]) == pytest.approx(0.2)
    assert instrument_time_s([10], [1.0], [5.0], 5.0) == pytest.approx(11.0)
    assert instrument_time_s() == 0.0
    assert stop_instrument_time_s([{"instrument_time_s": 1.5}, {}, {"instrument_time_s": 2}]) \
        == pytest.approx(3.5)
    assert stop_instrument_time_s([{}]) is None


def test_program_duration_covers_every_gate():
    program = pulses.ramsey(1e-6, references=True)
    assert len(program.gates) >= 3
    assert program.duration == pytest.approx(sum(
        max(p.start + p.duration for p in g.pulses) for g in program.gates))
    assert program.duration > max(g.duration for g in program.gates)


def _stops(docs: list[tuple[str, dict]]) -> list[dict]:
    return [d for n, d in docs if n == "stop"]


def _park(devices: Any, x: float, y: float, z: float):
    yield from bps.mv(devices.stage.x, x, devices.stage.y, y, devices.stage.z, z)


def test_rabi_run_costs_shots_times_each_program(devices: Any, RE: Any, collect: Any):
    InstrumentClock(devices).attach(RE)
    RE(_park(devices, 0.0, 0.0, 60.0))
    durations = [10e-9, 20e-9, 40e-9, 80e-9]
    shots = 3000
    docs = collect(plans.rabi(devices, durations, mw_frequency_hz=6.3e9, shots=shots))
    (stop,) = _stops(docs)
    expected = sum(shots * pulses.rabi(duration=t, references=True).duration
                   for t in durations)
    assert stop["instrument_time"]["acquisitions"] == len(durations)
    assert stop["instrument_time"]["travel_s"] == 0.0
    assert stop["instrument_time_s"] == pytest.approx(expected, rel=1e-12)


def test_ramsey_line_counts_its_stage_travel(devices: Any, RE: Any, collect: Any):
    clock = InstrumentClock(devices).attach(RE)
    assert RE.msg_hook is clock
    RE(_park(devices, 0.0, -20.0, 60.0))
    velocity = float(devices.stage.y.velocity.get())
    y = np.linspace(-20.0, -10.0, 11)
    shots, tau = 2000, 450e-9
    docs = collect(plans.ramsey_raster(devices, x=(0.0, 0.0, 1), y=(y[0], y[-1], y.size),
                                       z=60.0, mw_frequency_hz=6.3e9, tau_s=tau, shots=shots))
    (stop,) = _stops(docs)
    detail = stop["instrument_time"]
    start = next(d for n, d in docs if n == "start")
    (program,) = start["programs"].values()        # Ramsey, lock gates riding along
    # the lock's extra acquisitions (if any) run the same program
    assert detail["acquisitions"] >= y.size
    assert detail["shots_s"] == pytest.approx(
        detail["acquisitions"] * shots * pulses.Program.from_json(program).duration, rel=1e-12)
    # the tip starts at y = -20 and steps 1 nm ten times (x, z do not move)
    assert detail["travel_s"] == pytest.approx((y[-1] - y[0]) / velocity, rel=1e-9)
    assert stop["instrument_time_s"] == pytest.approx(detail["shots_s"] + detail["travel_s"])


class _Run:
    def __init__(self, stop: dict) -> None:
        self.metadata = {"stop": stop}


class _Catalog:
    """Stand-in for the catalog's ``run(uid).metadata`` (this unit test only)."""

    def __init__(self, stops: dict[str, dict]) -> None:
        self.stops = stops

    def run(self, uid: str) -> _Run:
        return _Run(self.stops[uid])


def test_report_sums_instrument_time_per_sample_and_in_total():
    from nvmri_bluesky.analysis.sample import instrument_time_part, merge
    from nvmri_bluesky.analysis.text import table

    cat = _Catalog({"a": {"instrument_time_s": 10.0}, "b": {"instrument_time_s": 5.5},
                    "c": {}, "d": {"instrument_time_s": 100.0}})
    one = instrument_time_part(cat, "s1", {"psf_map": "a", "deer_raster": "b", "old": "c"})
    assert one == {"total": 15.5, "samples": {"s1": 15.5},
                   "runs": {"s1/psf_map": 10.0, "s1/deer_raster": 5.5, "s1/old": None}}
    two = instrument_time_part(cat, "s2", {"psf_map": "d"})
    report = merge({"s1": {"instrument_time_s": one, "sample_wall_s": {"s1": 3.0}},
                    "s2": {"instrument_time_s": two, "sample_wall_s": {"s2": 4.0}}}, "here")
    assert report["instrument_time_s"]["total"] == pytest.approx(115.5)
    assert report["instrument_time_s"]["samples"] == {"s1": 15.5, "s2": 100.0}
    assert report["sample_wall_s"] == {"s1": 3.0, "s2": 4.0}
    report["elapsed_s"] = 9.0
    text = table(report)
    assert "instrument time, s1 (wall 3 s)" in text and "0.03 h (100 s)" in text
    assert "instrument time, total (wall 9 s)" in text
