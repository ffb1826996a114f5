"""The bluesky plans end to end against the simulated IOC subprocess.

Every measurement is graded against the scenario's truth, computed here with
:mod:`nvmri_bluesky.physics` (allowed in tests only): the plan under test only
sees Channel Access, the test knows where the tip, the NV and the spins are.

- characterisation and tip-free DEER plans agree with physics (ODMR dip, Rabi,
  Ramsey, echo decay, DEER evolution and spectrum);
- the frequency lock follows a drifting tip apex (the simulated clock is
  rebuilt from the plan's messages) and recovers from an injected frequency
  jump;
- bad arguments are refused with one line before anything moves or a run opens;
- start documents, descriptors and raster events carry what the docs promise,
  and each raster event's counts are the acquisition its results came from;
- a raster paused and resumed measures every grid point exactly once.

The IOCs run at time scale 0 with fixed seeds, so the photon noise of every
test is reproducible; shots are cheap in wall time (one Poisson draw per gate)
and are chosen for precision.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
import pytest
from bluesky.utils import RunEngineInterrupted
from scipy.optimize import curve_fit

import nvmri_bluesky
from nvmri_bluesky import physics, plans, pulses
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans.lock import FrequencyLock, gate_counts
from nvmri_bluesky.plans.stubs import load_program
from nvmri_bluesky.reconstruct.runs import run_dataset
from nvmri_bluesky.sim import launch

Docs = list[tuple[str, dict]]

TIP_NM = (0.0, 0.0, 30.0)
"""Where the fixed-position characterisation plans are run (f_nv ~ 6.487 GHz)."""
LOCK_TOLERANCE = 0.10
"""The lock must keep the MW within this fraction of the CW ODMR line width of f_nv."""
RASTER_Z0 = 40.0
"""Lowest plane of the lock rasters, nm (gradients ~8 MHz/nm)."""


# ---------------------------------------------------------------- helpers


def _split(docs: Docs) -> tuple[dict, list[dict], list[dict], dict | None]:
    """(start, descriptors, primary events, stop) of one run's documents."""
    starts = [d for n, d in docs if n == "start"]
    assert len(starts) == 1, f"expected one run, got {len(starts)} start documents"
    descriptors = [d for n, d in docs if n == "descriptor"]
    primary = {d["uid"] for d in descriptors if d.get("name") == "primary"}
    events = [d for n, d in docs if n == "event" and d["descriptor"] in primary]
    stops = [d for n, d in docs if n == "stop"]
    return starts[0], descriptors, events, (stops[0] if stops else None)


def _assert_units(descriptors: list[dict]) -> None:
    """Every data key (and configuration key) of every descriptor declares its units."""
    assert descriptors
    for desc in descriptors:
        keys = dict(desc["data_keys"])
        for conf in desc.get("configuration", {}).values():
            keys.update(conf.get("data_keys", {}))
        missing = sorted(k for k, v in keys.items() if not isinstance(v.get("units"), str))
        assert not missing, f"data keys without units in {desc.get('name')!r}: {missing}"


def _assert_completed(stop: dict | None, n_events: int, expected: int) -> None:
    assert stop is not None, "the run never stopped"
    assert stop["exit_status"] == "success", stop.get("reason")
    assert n_events == expected
    assert stop["num_events"].get("primary") == expected


def _true_f_nv(inst: physics.Instrument, apex_nm: Any, jump_hz: float = 0.0) -> float:
    """ms=0->+1 frequency with the apex at ``apex_nm`` and the bias stepped by ``jump_hz``."""
    bias = inst.b0_vector + jump_hz / physics.GAMMA_E * inst.nv_axis
    b_nv = bias + physics.tip_field(inst.nv_position_nm, np.asarray(apex_nm, float),
                                    inst.tip_radius_nm, inst.tip_moment_am2)
    return float(physics.nv_transition_frequencies(b_nv, inst.nv_axis)[0])


def _stage_position(nv: Any) -> np.ndarray:
    return np.array([m.position for m in (nv.stage.x, nv.stage.y, nv.stage.z)], float)


def _move_tip(RE: Any, nv: Any, position: tuple[float, float, float]) -> np.ndarray:
    x, y, z = position
    RE(bps.mv(nv.stage.z, z, nv.stage.x, x, nv.stage.y, y))
    here = _stage_position(nv)
    np.testing.assert_allclose(here, position, atol=1e-6)
    return here


def _tip_over_nv(fig4: Any, RE: Any) -> tuple[Any, physics.Instrument, np.ndarray, float]:
    """Park the tip at TIP_NM: (devices, instrument, stage position, true f_nv there)."""
    handle, nv = fig4
    inst = handle.scenario.instrument()
    here = _move_tip(RE, nv, TIP_NM)
    return nv, inst, here, _true_f_nv(inst, here)


def _assert_locked(data: dict, f_true: float, tolerance: float, where: str) -> None:
    """An event's locked frequency and the MW it used are both within ``tolerance`` of f_nv."""
    f_mw = data["lock_frequency"] - data["lock_error"]
    assert abs(data["lock_frequency"] - f_true) < tolerance, (
        f"{where}: locked {(data['lock_frequency'] - f_true) / 1e6:+.3f} MHz from f_nv")
    assert abs(f_mw - f_true) < tolerance, (
        f"{where}: MW {(f_mw - f_true) / 1e6:+.3f} MHz from f_nv")


def _populations(ds: Any, gate: str) -> np.ndarray:
    """Normalised ms=0 population of ``gate`` from its bright/dark references."""
    return np.asarray(physics.normalised_population(ds[gate], ds["bright"], ds["dark"]))


def _sine_frequency(t: np.ndarray, y: np.ndarray, f_grid: np.ndarray,
                    envelope: np.ndarray | None = None) -> float:
    """Frequency of y ~ c0 + env (c1 cos 2 pi f t + c2 sin 2 pi f t): grid search, then refined.

    The grid search is a linear least-squares fit per trial frequency, so the
    result does not depend on a starting guess.
    """
    env = np.ones_like(t) if envelope is None else envelope

    def design(f: float) -> np.ndarray:
        w = 2 * np.pi * f * t
        return np.column_stack([np.ones_like(t), env * np.cos(w), env * np.sin(w)])

    def residual(f: float) -> float:
        a = design(f)
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        return float(np.sum((a @ coef - y) ** 2))

    f0 = f_grid[int(np.argmin([residual(f) for f in f_grid]))]
    c0 = np.linalg.lstsq(design(f0), y, rcond=None)[0]

    def model(tt: np.ndarray, f: float, a0: float, a1: float, a2: float) -> np.ndarray:
        w = 2 * np.pi * f * tt
        return a0 + env * (a1 * np.cos(w) + a2 * np.sin(w))

    popt, _ = curve_fit(model, t, y, p0=[f0, *c0])
    return float(popt[0])


class SimClock:
    """The IOC's simulated clock, rebuilt from the plan's messages (a RunEngine msg_hook).

    The engine (``sim/engine.py``) advances its time by ``shots * program.duration``
    per acquisition and by ``distance / velocity`` per stage move, and evaluates an
    acquisition with the apex at the time it starts.  ``acquisitions[k]`` is
    (time, stage position) at the start of acquisition k (``CNT:ACQ_ID`` k + 1).
    """

    def __init__(self, nv: Any, scenario: Any) -> None:
        self.nv = nv
        self.velocity = scenario.stage.velocity_nm_per_s
        self.position = np.array(scenario.stage.start_nm, float)
        self.time_s = 0.0
        self.duration_s = 0.0
        self.shots = 1000
        self.acquisitions: list[tuple[float, np.ndarray]] = []
        self._axis = {nv.stage.x.name: 0, nv.stage.y.name: 1, nv.stage.z.name: 2}

    def __call__(self, msg: Any) -> None:
        obj = msg.obj
        if msg.command == "set":
            if obj is self.nv.pulser.program or obj is self.nv.pulser:
                program = msg.args[0]
                if not isinstance(program, pulses.Program):
                    program = pulses.Program.from_json(program)
                self.duration_s = program.duration
            elif obj is self.nv.pulser.shots:
                self.shots = int(msg.args[0])
            elif getattr(obj, "name", None) in self._axis:
                i, target = self._axis[obj.name], float(msg.args[0])
                self.time_s += abs(target - self.position[i]) / self.velocity
                self.position[i] = target
        elif msg.command == "trigger" and obj is self.nv.counter:
            self.acquisitions.append((self.time_s, self.position.copy()))
            self.time_s += self.shots * self.duration_s


def _lock_offsets(start: dict, event: dict) -> tuple[float, float]:
    """(lock error, DEER contrast) recomputed from the event's own ``counter_counts``."""
    gates = [g["name"] for g in next(iter(start["programs"].values()))["gates"]]
    counts = gate_counts(gates, event["data"]["counter_counts"])
    offset, _ = FrequencyLock().offset(counts)
    contrast = physics.deer_contrast(counts["signal"], counts["echo"], counts["bright"],
                                     counts["dark"])
    return float(offset), float(contrast)


def _grid_points(x: tuple, y: tuple, z: tuple) -> set[tuple[float, float, float]]:
    axes = [np.linspace(a, b, n) for a, b, n in (x, y, z)]
    return {(round(px, 6), round(py, 6), round(pz, 6))
            for pz, py, px in itertools.product(axes[2], axes[1], axes[0])}


def _event_points(events: list[dict]) -> list[tuple[float, float, float]]:
    return [tuple(round(float(e["data"][f"stage_{a}"]), 6) for a in "xyz") for e in events]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fig4() -> Iterator[tuple[launch.IocHandle, Any]]:
    """A ``paper-fig4`` IOC (five dark spins, no drift) and its devices, for this module."""
    from nvmri_bluesky.devices import make_devices

    with launch.start_ioc("paper-fig4", time_scale=0.0) as handle:
        nv = make_devices(handle.prefix, connection_timeout=10.0)
        try:
            yield handle, nv
        finally:
            nv.destroy()


@pytest.fixture
def run_docs(RE: Any) -> Callable[..., Docs]:
    """``run_docs(plan, msg_hook=None)``: run a plan, return its documents."""

    def run(plan: Any, msg_hook: Callable | None = None) -> Docs:
        docs: Docs = []
        token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
        RE.msg_hook = msg_hook
        try:
            RE(plan)
        finally:
            RE.unsubscribe(token)
            RE.msg_hook = None
        return docs

    return run


# ---------------------------------------------------------------- 1. physics


@pytest.mark.timeout(120)
def test_odmr_sweep_dip_at_f_nv(fig4: Any, RE: Any, run_docs: Any) -> None:
    nv, inst, here, f_nv = _tip_over_nv(fig4, RE)
    fwhm = 1.0 / inst.tau_cw_s
    docs = run_docs(plans.odmr_sweep(nv, f_nv - 14e6, f_nv + 10e6, 17, shots=2_000_000))
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), 17)
    np.testing.assert_allclose(_stage_position(nv), here, atol=1e-6)   # a fixed-tip plan
    gates = [g["name"] for g in next(iter(start["programs"].values()))["gates"]]
    assert gates == ["cw_0", "cw_1"]
    ds = run_dataset(start, events, stop)
    f = np.asarray(ds["mw_frequency"], float)
    ratio = np.asarray(ds["cw_0"] / ds["cw_1"], float)        # on resonance / far off

    def dip(x, a, depth, f0, width):
        return a * (1.0 - depth / (1.0 + (2.0 * (x - f0) / width) ** 2))

    (a, depth, f0, width), _ = curve_fit(dip, f, ratio,
                                         p0=[1.0, 0.1, f[np.argmin(ratio)], 10e6])
    assert abs(f0 - f_nv) < 0.05 * fwhm, f"ODMR dip at {f0 / 1e9:.6f} GHz, f_nv {f_nv / 1e9:.6f}"
    assert width == pytest.approx(fwhm, rel=0.15)
    assert depth == pytest.approx(inst.contrast_cw, rel=0.15)
    assert a == pytest.approx(1.0, abs=0.02)
    _assert_units(descriptors)


@pytest.mark.timeout(120)
def test_rabi_period_matches_mw_rabi_frequency(fig4: Any, RE: Any, run_docs: Any) -> None:
    nv, inst, here, f_nv = _tip_over_nv(fig4, RE)
    power = float(nv.mw.power.get())
    rabi_hz = float(physics.rabi_from_power(power, pulses.MW_RABI_HZ))
    if power == 0.0:
        assert rabi_hz == pytest.approx(20e6)          # the default drive: pi = 25 ns
    durations = np.arange(4e-9, 100.1e-9, 4e-9)
    docs = run_docs(plans.rabi(nv, list(durations), f_nv, shots=10_000_000))
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), len(durations))
    ds = run_dataset(start, events, stop)
    assert {"rabi", "bright", "dark"} <= set(ds.data_vars)
    t = np.asarray(ds["mw_duration"], float)
    np.testing.assert_allclose(t, durations, rtol=1e-9)
    p0 = _populations(ds, "rabi")
    # P0 = 1 - sin^2(pi Omega t) = (1 + cos 2 pi Omega t)/2: a cosine at Omega
    f_fit = _sine_frequency(t, p0, np.linspace(5e6, 60e6, 221))
    assert f_fit == pytest.approx(rabi_hz, rel=0.015)
    expected = 1.0 - physics.rabi_flip_probability(0.0, rabi_hz, t)
    assert np.max(np.abs(p0 - expected)) < 0.06
    _assert_units(descriptors)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mw_offset_hz", [+1e6, -3e6], ids=["mw_plus_1MHz", "mw_minus_3MHz"])
def test_ramsey_frequency_is_the_detuning(fig4: Any, RE: Any, run_docs: Any,
                                          mw_offset_hz: float) -> None:
    """Fringes at |f_nv - (f_mw + detuning)|: +1 MHz -> 3 MHz, -3 MHz -> 1 MHz (2 MHz sideband)."""
    nv, inst, here, f_nv = _tip_over_nv(fig4, RE)
    detuning = 2e6
    f_mw = f_nv + mw_offset_hz
    expected = abs(f_nv - (f_mw + detuning))
    taus = np.arange(20e-9, 1.5e-6, 50e-9)
    docs = run_docs(plans.ramsey(nv, list(taus), f_mw, detuning_hz=detuning,
                                  shots=10_000_000))
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), len(taus))
    assert start["plan_args"]["detuning_hz"] == detuning
    ds = run_dataset(start, events, stop)
    t = np.asarray(ds["tau"], float)
    p0 = _populations(ds, "ramsey")
    envelope = np.exp(-((t / inst.nv_t2_star_s) ** 2))
    f_fit = _sine_frequency(t, p0, np.linspace(0.2e6, 8e6, 157), envelope)
    assert f_fit == pytest.approx(expected, abs=0.05e6), (
        f"Ramsey fringes at {f_fit / 1e6:.3f} MHz, expected {expected / 1e6:.3f} MHz")
    _assert_units(descriptors)


@pytest.mark.timeout(120)
def test_echo_decays_with_t2_and_exponent(fig4: Any, RE: Any, run_docs: Any) -> None:
    nv, inst, here, f_nv = _tip_over_nv(fig4, RE)
    assert (inst.nv_t2_s, inst.nv_t2_exponent) == (20e-6, 1.5)
    taus = np.array([1, 3, 6, 9, 12, 16, 20, 25, 30, 36]) * 1e-6
    docs = run_docs(plans.echo(nv, list(taus), f_nv, shots=10_000_000))
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), len(taus))
    ds = run_dataset(start, events, stop)
    t = np.asarray(ds["tau"], float)
    coherence = 2.0 * _populations(ds, "echo") - 1.0

    def decay(tt, amp, t2, n):
        return amp * np.exp(-((tt / t2) ** n))

    (amp, t2, n), _ = curve_fit(decay, t, coherence, p0=[1.0, 10e-6, 1.0])
    assert t2 == pytest.approx(inst.nv_t2_s, rel=0.05)
    assert n == pytest.approx(inst.nv_t2_exponent, abs=0.12)
    assert amp == pytest.approx(1.0, abs=0.05)
    truth = physics.echo_coherence(t, inst.nv_t2_s, inst.nv_t2_exponent)
    assert np.max(np.abs(coherence - truth)) < 0.04
    _assert_units(descriptors)


def _tip_free_deer_truth(handle: launch.IocHandle, nv: Any, rf_hz: Any, tau_s: Any,
                         rf_duration_s: float) -> np.ndarray:
    """DEER contrast (E - S)/E = 1 - prod_j (1 - p_j w_j) with the tip where the plan left it."""
    scenario = handle.scenario
    inst = scenario.instrument()
    apex = _stage_position(nv)
    assert apex[2] == pytest.approx(scenario.stage.z_max_nm)      # the plan retracted the tip
    spins = scenario.spin_positions()
    b = inst.b0_vector + physics.tip_field(spins, apex, inst.tip_radius_nm, inst.tip_moment_am2)
    f_j = physics.dark_spin_frequency(b)
    nu = physics.dipolar_coupling(spins - inst.nv_position_nm, inst.nv_axis)
    rf = np.atleast_1d(np.asarray(rf_hz, float))[:, None]
    p = physics.dark_flip_probability(rf - f_j, rf_duration_s, inst.dark_t2_star_s)
    w = physics.deer_weight(nu, np.atleast_1d(np.asarray(tau_s, float))[:, None])
    return 1.0 - np.prod(1.0 - p * w, axis=-1)


@pytest.mark.timeout(150)
def test_deer_evolution_oscillates_at_the_spin_coupling(fig4: Any, RE: Any,
                                                        run_docs: Any) -> None:
    handle, nv = fig4
    scenario = handle.scenario
    inst = scenario.instrument()
    spins = scenario.spin_positions()
    nu = physics.dipolar_coupling(spins - inst.nv_position_nm, inst.nv_axis)
    strongest = int(np.argmax(np.abs(nu)))
    nu0 = abs(float(nu[strongest]))                          # ~117 kHz: period 2/nu ~ 17 us
    assert nu0 > 10 * np.sort(np.abs(nu))[-2]
    rf_hz = inst.f_dark0
    taus = np.arange(1e-6, 16.1e-6, 1.5e-6)
    docs = run_docs(plans.deer_evolution(nv, list(taus), rf_hz, mw_frequency_hz=inst.f_nv0,
                                         shots=20_000_000))
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), len(taus))
    ds = run_dataset(start, events, stop)
    t = np.asarray(ds["tau"], float)
    contrast = np.asarray(ds["deer_contrast"], float)
    # (E - S)/E = 1 - cos(pi nu tau) for one flipped spin: a cosine at nu/2 in tau
    f_fit = _sine_frequency(t, contrast, np.linspace(10e3, 200e3, 381))
    assert 2 * f_fit == pytest.approx(nu0, rel=0.05), (
        f"DEER oscillates at {2 * f_fit / 1e3:.1f} kHz, coupling {nu0 / 1e3:.1f} kHz")
    truth = _tip_free_deer_truth(handle, nv, rf_hz, t, 100e-9)
    assert np.max(np.abs(contrast - truth)) < 0.15
    assert np.ptp(contrast) == pytest.approx(np.ptp(truth), abs=0.1)   # 0 -> 2 p (p ~ 0.5)
    _assert_units(descriptors)


@pytest.mark.timeout(150)
def test_deer_spectrum_peaks_at_gamma_b0(fig4: Any, RE: Any, run_docs: Any) -> None:
    handle, nv = fig4
    inst = handle.scenario.instrument()
    f_dark0 = float(physics.dark_spin_frequency(inst.b0_vector))      # gamma |B0|
    nu = physics.dipolar_coupling(handle.scenario.spin_positions() - inst.nv_position_nm,
                                  inst.nv_axis)
    tau = 1.0 / float(np.max(np.abs(nu)))                   # cos(pi nu tau) = -1: contrast 2 p
    docs = run_docs(plans.deer_spectrum(nv, f_dark0 - 21e6, f_dark0 + 15e6, 13, tau_s=tau,
                                        mw_frequency_hz=inst.f_nv0, shots=10_000_000))
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), 13)
    ds = run_dataset(start, events, stop)
    f = np.asarray(ds["rf_frequency"], float)
    contrast = np.asarray(ds["deer_contrast"], float)

    def line(x, base, height, f0, width):
        return base + height / (1.0 + (2.0 * (x - f0) / width) ** 2)

    (_, height, f0, _), _ = curve_fit(line, f, contrast,
                                      p0=[0.0, 1.0, f[np.argmax(contrast)], 10e6])
    assert abs(f0 - f_dark0) < 1e6, (f"DEER line at {f0 / 1e9:.6f} GHz, gamma |B0| = "
                                     f"{f_dark0 / 1e9:.6f} GHz")
    truth = _tip_free_deer_truth(handle, nv, f, tau, 100e-9)
    assert height == pytest.approx(truth.max(), abs=0.15)
    assert np.max(np.abs(contrast - truth)) < 0.15
    _assert_units(descriptors)

# ---------------------------------------------------------------- 2. the lock


@pytest.mark.timeout(180)
def test_deer_raster_lock_follows_drifting_apex(make_ioc: Any, RE: Any, run_docs: Any) -> None:
    """With the apex drifting, f_mw and the locked frequency track f_nv at the *true* apex.

    The drift is slow per acquisition (0.02 nm in one 300k-shot acquisition) but
    adds up to ~1.5 nm over the raster (~10 MHz at these gradients), so a lock
    that followed the stage readback instead of the NV line would fail.
    """
    drift = [4e-4, 2.5e-4, 0.0]
    scenario = {"name": "drift", "seed": 11, "tip": {"drift_nm_per_s": drift},
                "dark_spins": {"points": [{"x_nm": 4.0, "y_nm": 5.1, "z_nm": -13.65}]}}
    handle, nv = make_ioc(scenario)
    inst = handle.scenario.instrument()
    clock = SimClock(nv, handle.scenario)
    x, y, z = (-4.0, 4.0, 3), (-4.0, 4.0, 3), (RASTER_Z0, RASTER_Z0 + 4.0, 3)
    f_start = _true_f_nv(inst, [x[0], y[0], z[0]])
    docs = run_docs(plans.deer_raster(nv, x=x, y=y, z=z, rf_frequency_hz=inst.f_dark0,
                                      tau_s=2e-6, mw_frequency_hz=f_start, shots=300_000),
                    msg_hook=clock)
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), 27)
    assert sorted(_event_points(events)) == sorted(_grid_points(x, y, z))
    tolerance = LOCK_TOLERANCE / inst.tau_cw_s
    drift_effect = 0.0
    for ev in events:
        d = ev["data"]
        k = int(d["counter_acq_id"]) - 1          # the lock settled on the last acquisition
        t_acq, stage_at_acq = clock.acquisitions[k]
        stage = np.array([d["stage_x"], d["stage_y"], d["stage_z"]])
        np.testing.assert_allclose(stage_at_acq, stage, atol=1e-6)   # the clock saw the moves
        f_true = _true_f_nv(inst, physics.apex_with_drift(stage, drift, t_acq))
        _assert_locked(d, f_true, tolerance,
                       f"point {np.round(stage, 2)} at t = {t_acq:.0f} s")
        drift_effect = max(drift_effect, abs(_true_f_nv(inst, stage) - f_true))
    # The test discriminates: the readback alone would be far outside the tolerance.
    assert drift_effect > 5 * tolerance, drift_effect
    assert clock.time_s > 1000.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("jump_hz", [40e6, 150e6], ids=["40MHz", "150MHz"])
def test_lock_reacquires_after_frequency_jump(make_ioc: Any, RE: Any, run_docs: Any,
                                              jump_hz: float) -> None:
    """A bias step of 40 MHz (inside the finder gates' reach) or 150 MHz (outside).

    Both leave the pair's capture range (FWHM/sqrt(2) ~ 5.9 MHz): the lock is lost
    and must be re-acquired (``lock.py``'s docstring), the raster completes and
    every point after the jump is locked to the shifted line.
    """
    after = 10
    scenario = {"name": "jump", "seed": 12,
                "dark_spins": {"points": [{"x_nm": 4.0, "y_nm": 5.1, "z_nm": -13.65}]},
                "faults": [{"kind": "frequency_jump", "after_acquisitions": after,
                            "hz": jump_hz}]}
    handle, nv = make_ioc(scenario)
    inst = handle.scenario.instrument()
    x, y, z = (-4.0, 4.0, 3), (-4.0, 4.0, 3), (RASTER_Z0, RASTER_Z0 + 4.0, 2)
    f_start = _true_f_nv(inst, [x[0], y[0], z[0]])
    docs = run_docs(plans.deer_raster(nv, x=x, y=y, z=z, rf_frequency_hz=inst.f_dark0,
                                      tau_s=2e-6, mw_frequency_hz=f_start, shots=300_000))
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), 18)
    assert sorted(_event_points(events)) == sorted(_grid_points(x, y, z))
    tolerance = LOCK_TOLERANCE / inst.tau_cw_s
    jumped = 0
    before_jump = 0
    for ev in events:
        d = ev["data"]
        k = int(d["counter_acq_id"]) - 1          # index of the recorded acquisition
        stage = np.array([d["stage_x"], d["stage_y"], d["stage_z"]])
        shift = jump_hz if k >= after else 0.0
        jumped += bool(shift)
        f_true = _true_f_nv(inst, stage, shift)
        assert abs(_true_f_nv(inst, stage, jump_hz) - _true_f_nv(inst, stage)) > 0.9 * jump_hz
        _assert_locked(d, f_true, tolerance,
                       f"point {np.round(stage, 2)} (acquisition {k}, jumped: {bool(shift)})")
        if not shift:           # (a new plane's first point may need one, too)
            before_jump = d["lock_reacquisitions"]
    assert 0 < jumped < len(events)
    assert events[-1]["data"]["lock_reacquisitions"] > before_jump, (
        f"a {jump_hz / 1e6:.0f} MHz jump took the line out of the lock's capture range, "
        "yet lock_reacquisitions stayed 0")


# ---------------------------------------------------------------- 3. refusals


def _bad_plans(inst: physics.Instrument, z_min: float) -> dict[str, tuple[Callable, str]]:
    """name -> (plan factory taking the instrument, a word the one-line refusal must contain)."""
    rf0 = inst.f_dark0
    return {
        "raster below z_min": (lambda nv: plans.deer_raster(
            nv, x=(-4, 4, 3), y=(-4, 4, 3), z=(z_min - 2.0, z_min + 10.0, 3),
            rf_frequency_hz=rf0), "z_min"),
        "2D raster below z_min": (lambda nv: plans.deer_raster(
            nv, x=(-4, 4, 3), y=(-4, 4, 3), z=z_min - 0.5, rf_frequency_hz=rf0), "z_min"),
        "esr raster below z_min": (lambda nv: plans.esr_raster(
            nv, x=(-4, 4, 3), y=(-4, 4, 3), z=(30.0, z_min - 1.0, 3),
            mw_frequency_hz=6.4e9), "z_min"),
        "zero step": (lambda nv: plans.deer_raster(
            nv, x=(5.0, 5.0, 3), y=(-4, 4, 3), z=30.0, rf_frequency_hz=rf0), "step"),
        "negative tau": (lambda nv: plans.deer_raster(
            nv, x=(-4, 4, 3), y=(-4, 4, 3), z=30.0, rf_frequency_hz=rf0, tau_s=-1e-6), "tau"),
        "negative echo tau": (lambda nv: plans.echo(
            nv, [1e-6, -2e-6], 6.4e9), "tau"),
        "negative deer_evolution tau": (lambda nv: plans.deer_evolution(
            nv, [2e-6, -1e-6], rf0), "tau"),
        "RF above its range": (lambda nv: plans.deer_raster(
            nv, x=(-4, 4, 3), y=(-4, 4, 3), z=30.0, rf_frequency_hz=5e10), "rf"),
        "RF spectrum outside its range": (lambda nv: plans.deer_spectrum(
            nv, 3.3e9, 4.5e10, 5), "rf"),
        "MW outside its range": (lambda nv: plans.odmr_sweep(nv, 5e4, 6.4e9, 11), "start_hz"),
    }


_BAD_CASES = list(_bad_plans(physics.Instrument(), physics.Z_MIN_NM))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", _BAD_CASES)
def test_bad_arguments_refused_before_anything_moves(fig4: Any, RE: Any, case: str) -> None:
    handle, nv = fig4
    inst = handle.scenario.instrument()
    z_min = float(nv.stage.z.limits[0])
    assert z_min >= handle.scenario.z_min_nm
    factory, word = _bad_plans(inst, z_min)[case]
    before = _move_tip(RE, nv, (1.0, -2.0, 60.0))
    f_mw_before = nv.mw.frequency.get()
    messages: list[Any] = []
    docs: Docs = []
    token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE.msg_hook = messages.append
    try:
        with pytest.raises(NvmriError) as info:
            RE(factory(nv))
    finally:
        RE.unsubscribe(token)
        RE.msg_hook = None
    text = str(info.value)
    assert text and "\n" not in text, f"not one line: {text!r}"
    assert word.lower() in text.lower(), text
    assert not [n for n, _ in docs if n == "start"], "a run was opened"
    assert not messages, f"the plan acted before refusing: {[m.command for m in messages]}"
    np.testing.assert_allclose(_stage_position(nv), before, atol=1e-9)
    assert nv.mw.frequency.get() == f_mw_before


def _unreadable_program() -> pulses.Program:
    """Well formed (``Program.validate`` accepts it) but 4 MW pulses: the simulator refuses it."""
    init, wait = pulses.LASER_INIT_S, pulses.WAIT_S
    mw = tuple(pulses.Pulse("mw", init + wait + i * 50e-9, 20e-9) for i in range(4))
    t_read = init + wait + 250e-9
    gate = pulses.Gate("four", (pulses.Pulse("laser", 0.0, init), *mw,
                                pulses.Pulse("laser", t_read, pulses.READOUT_S),
                                pulses.Pulse("counter", t_read, pulses.WINDOW_S)))
    return pulses.Program("four_pulses", (gate,)).validate()


@pytest.mark.timeout(60)
def test_invalid_pulse_program_refused_with_one_line(fig4: Any, RE: Any) -> None:
    handle, nv = fig4
    good = pulses.cw_odmr((0.0, 200e6))
    nv.pulser.load(good)
    gates_before = nv.pulser.gate_names()
    before = _move_tip(RE, nv, (0.0, 3.0, 55.0))
    bad = _unreadable_program()
    docs: Docs = []
    token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
    try:
        with pytest.raises(NvmriError) as info:
            RE(load_program(nv.pulser, bad))
    finally:
        RE.unsubscribe(token)
    text = str(info.value)
    assert "\n" not in text and "four_pulses" in text and "4 MW pulses" in text, text
    assert not docs, "a run was opened"
    with pytest.raises(NvmriError) as direct:
        nv.pulser.load(bad)
    assert "\n" not in str(direct.value) and "refused" in str(direct.value)
    assert nv.pulser.gate_names() == gates_before                 # loaded program unchanged
    np.testing.assert_allclose(_stage_position(nv), before, atol=1e-9)
    # a malformed program never reaches the IOC: one line from the data model
    broken = json.loads(good.to_json())
    broken["gates"][0]["pulses"][2]["start"] = 1.0                # counter outside the laser
    with pytest.raises(NvmriError) as model:
        pulses.Program.from_json(broken)
    assert "\n" not in str(model.value) and "counter" in str(model.value)


# ---------------------------------------------------------------- 4. metadata


@pytest.mark.timeout(120)
def test_raster_documents_metadata_units_and_event_keys(fig4: Any, RE: Any,
                                                        run_docs: Any) -> None:
    handle, nv = fig4
    inst = handle.scenario.instrument()
    x, y, z = (-3.0, 3.0, 3), (-2.0, 2.0, 2), (RASTER_Z0, RASTER_Z0 + 2.0, 2)
    f_start = _true_f_nv(inst, [x[0], y[0], z[0]])
    docs = run_docs(plans.deer_raster(nv, x=x, y=y, z=z, rf_frequency_hz=inst.f_dark0 + 1e6,
                                      tau_s=4e-6, mw_frequency_hz=f_start, shots=200_000,
                                      md={"sample": "test"}))
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), 12)
    # start document
    assert start["plan_name"] == "deer_raster"
    args = start["plan_args"]
    assert args["x"] == list(x) and args["y"] == list(y) and args["z"] == list(z)
    assert args["rf_frequency_hz"] == inst.f_dark0 + 1e6 and args["tau_s"] == 4e-6
    assert args["shots"] == 200_000 and args["snake"] is True
    assert start["prefix"] == handle.prefix
    assert start["nvmri_version"] == nvmri_bluesky.__version__
    assert start["sample"] == "test"
    grid = start["grid"]
    assert grid["shape"] == [2, 2, 3]                             # slowest first: z, y, x
    assert grid["axes"] == ["stage_z", "stage_y", "stage_x"]
    assert grid["extents"] == [[z[0], z[1]], [y[0], y[1]], [x[0], x[1]]]
    assert grid["snake"] is True
    assert set(start["programs"]) == {"deer"}
    program = pulses.Program.from_json(start["programs"]["deer"])
    assert program.gate_names[:4] == ["signal", "echo", "bright", "dark"]
    assert {"lock_0", "lock_1", "lock_2"} <= set(program.gate_names)
    # descriptors and events
    _assert_units(descriptors)
    keys = descriptors[0]["data_keys"]
    assert keys["lock_frequency"]["units"] == "Hz" and keys["lock_error"]["units"] == "Hz"
    assert keys["stage_x"]["units"] == "nm" and keys["counter_counts"]["units"] == "counts"
    required = {"stage_x", "stage_y", "stage_z", "lock_frequency", "lock_error",
                "counter_counts", "deer_contrast"}
    for ev in events:
        assert required <= set(ev["data"]), required - set(ev["data"])
        assert len(ev["data"]["counter_counts"]) == len(program.gate_names)
        assert all(np.isfinite(ev["data"][k]) for k in ("lock_frequency", "lock_error",
                                                        "deer_contrast"))
    assert sorted(_event_points(events)) == sorted(_grid_points(x, y, z))
    # run_dataset reads the run onto its grid
    ds = run_dataset(start, events, stop)
    assert ds.attrs["complete"] and ds["lock_frequency"].shape == (3, 2, 2)


@pytest.mark.timeout(120)
def test_raster_event_counts_are_the_acquisition_the_results_came_from(
        make_ioc: Any, RE: Any, run_docs: Any) -> None:
    """An event's ``counter_counts`` must be the acquisition its lock_error and DEER contrast
    were computed from, also when the lock runs out of iterations and keeps an earlier one.

    Few shots make the lock noisy so some points exhaust ``max_iterations`` (a fresh
    IOC with a fixed seed: the photon noise, hence which points, is reproducible).
    """
    handle, nv = make_ioc("paper-fig4")
    inst = handle.scenario.instrument()
    triggers: list[int] = []

    def hook(msg: Any) -> None:
        if msg.command == "trigger" and msg.obj is nv.counter:
            triggers.append(1)
        elif msg.command == "save":
            triggers.append(0)

    x, y, z = (-4.0, 4.0, 4), (-4.0, 4.0, 4), RASTER_Z0
    f_start = _true_f_nv(inst, [x[0], y[0], z])
    docs = run_docs(plans.deer_raster(nv, x=x, y=y, z=z, rf_frequency_hz=inst.f_dark0,
                                      tau_s=2e-6, mw_frequency_hz=f_start, shots=5_000),
                    msg_hook=hook)
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), 16)
    per_point = [len(list(g)) for k, g in itertools.groupby(triggers) if k == 1]
    exhausted = sum(n >= FrequencyLock().max_iterations for n in per_point)
    assert exhausted, f"precondition: no point used all lock iterations ({per_point})"
    bad = []
    for ev in events:
        offset, contrast = _lock_offsets(start, ev)
        d = ev["data"]
        if not (np.isclose(offset, d["lock_error"], rtol=1e-9, atol=1.0)
                and np.isclose(contrast, d["deer_contrast"], rtol=1e-9, atol=1e-12)):
            bad.append(f"seq {ev['seq_num']}: counts give lock_error {offset / 1e6:+.3f} MHz, "
                       f"contrast {contrast:.4f}; recorded {d['lock_error'] / 1e6:+.3f} MHz, "
                       f"{d['deer_contrast']:.4f}")
    assert not bad, "; ".join(bad)


# ---------------------------------------------------------------- 5. pause / resume


@pytest.mark.timeout(180)
@pytest.mark.parametrize("when", ["after_event", "mid_lock"])
def test_paused_raster_resumes_with_every_point_once(fig4: Any, RE: Any, when: str) -> None:
    """``RE.request_pause()`` (from another thread, as Ctrl-C does) after 5 events, or in
    the middle of a point's lock; ``RE.resume()`` then completes the raster."""
    handle, nv = fig4
    inst = handle.scenario.instrument()
    docs: Docs = []
    seen = {"events": 0, "triggers": 0}
    pausers: list[threading.Thread] = []

    def pause() -> None:
        thread = threading.Thread(target=RE.request_pause, daemon=True)
        pausers.append(thread)
        thread.start()

    def on_doc(name: str, doc: dict) -> None:
        docs.append((name, doc))
        if name == "event":
            seen["events"] += 1
            if when == "after_event" and seen["events"] == 5:
                pause()

    def hook(msg: Any) -> None:
        if msg.command == "trigger" and msg.obj is nv.counter:
            seen["triggers"] += 1
            if when == "mid_lock" and seen["triggers"] == 14:
                pause()
                time.sleep(0.1)                # let the pause land inside this point's lock

    x, y, z = (-4.0, 4.0, 3), (-4.0, 4.0, 3), (RASTER_Z0, RASTER_Z0 + 4.0, 2)
    f_start = _true_f_nv(inst, [x[0], y[0], z[0]])
    token = RE.subscribe(on_doc)
    RE.msg_hook = hook
    plan = plans.deer_raster(nv, x=x, y=y, z=z, rf_frequency_hz=inst.f_dark0, tau_s=2e-6,
                             mw_frequency_hz=f_start, shots=300_000)
    try:
        with pytest.raises(RunEngineInterrupted):
            RE(plan)
        assert RE.state == "paused"
        paused_at = seen["events"]
        assert 0 < paused_at < 18
        RE.resume()
    finally:
        RE.unsubscribe(token)
        RE.msg_hook = None
        for thread in pausers:
            thread.join(5)
    start, descriptors, events, stop = _split(docs)
    _assert_completed(stop, len(events), 18)
    points = _event_points(events)
    assert len(points) == len(set(points)), "a grid point was measured twice"
    assert set(points) == _grid_points(x, y, z)
    assert [e["seq_num"] for e in events] == list(range(1, 19))
    tolerance = LOCK_TOLERANCE / inst.tau_cw_s
    for ev in events:
        d = ev["data"]
        f_true = _true_f_nv(inst, [d["stage_x"], d["stage_y"], d["stage_z"]])
        assert abs(d["lock_frequency"] - f_true) < tolerance
        assert abs(d["lock_frequency"] - d["lock_error"] - f_true) < tolerance
        offset, contrast = _lock_offsets(start, ev)
        assert offset == pytest.approx(d["lock_error"], abs=1.0), f"seq {ev['seq_num']}"
