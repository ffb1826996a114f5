"""The simulator engine: gates -> counts, following physics.py."""

import time

import numpy as np
import pytest
from scipy.optimize import curve_fit

from nvmri_bluesky import physics as ph
from nvmri_bluesky import pulses as P
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.pulses import Gate, Program, Pulse
from nvmri_bluesky.sim.engine import Engine

SPIN = {"x_nm": 4.0, "y_nm": 5.1, "z_nm": -13.65}


def engine(scenario=None, apex=(10.0, -5.0, 30.0), **kw):
    e = Engine(scenario or {"name": "test"}, **kw)
    for axis, value in zip("xyz", apex, strict=True):
        e.move(axis, value)
    e.mw.on = True
    return e


def p0(e, program, gate):
    """Normalised ms=0 population of ``gate`` from the expected counts."""
    e.load(program)
    counts = dict(zip(e.gate_names, e.expected_counts(), strict=True))
    return ph.normalised_population(counts[gate], counts["bright"], counts["dark"])


def test_odmr_dip_at_f_nv():
    e = engine()
    f_nv = float(e.instrument.f_nv(e.apex()))
    e.mw.freq_hz = round(f_nv, -6)
    det = np.arange(-20e6, 20e6, 0.1e6)
    e.load(P.cw_odmr(det))
    e.shots = 1_000_000
    mean = e.expected_counts()
    assert e.mw.freq_hz + det[np.argmin(mean)] == pytest.approx(f_nv, abs=0.06e6)
    assert mean.min() == pytest.approx(e.shots * 0.3 * (1 - 0.15), rel=1e-3)
    noisy = e.acquire()
    assert abs(e.mw.freq_hz + det[np.argmin(noisy)] - f_nv) < 1e6


def test_cw_counts_follow_tip_height():
    e = engine()
    e.load(P.cw_odmr((0.0,)))
    e.shots = 10_000
    e.mw.freq_hz = e.instrument.f_nv0 + 100e6
    for z in (8.0, 20.0, 40.0, 80.0, 300.0):
        e.move("z", z)
        f_nv = e.instrument.f_nv(e.apex())
        want = ph.cw_counts(e.mw.freq_hz, f_nv, e.shots, P.CW_WINDOW_S)
        assert e.expected_counts()[0] == pytest.approx(want, rel=1e-12)
    e.move("z", 40.0)
    draws = np.array([e.acquire()[0] for _ in range(400)])
    mean = e.expected_counts()[0]
    assert draws.mean() == pytest.approx(mean, abs=4 * np.sqrt(mean / 400))
    assert draws.var() == pytest.approx(mean, rel=0.25)             # Poisson


def test_minus_transition_is_driven_when_nearer():
    e = engine()
    _, f_minus = ph.nv_transition_frequencies(
        e.instrument.field_at(e.instrument.nv_position_nm, e.apex()), e.instrument.nv_axis)
    e.mw.freq_hz = round(abs(float(f_minus)), -6)
    det = np.arange(-20e6, 20e6, 0.1e6)
    e.load(P.cw_odmr(det))
    assert e.mw.freq_hz + det[np.argmin(e.expected_counts())] == pytest.approx(
        abs(f_minus), abs=0.06e6)


def test_rabi_oscillation_and_power():
    e = engine()
    e.mw.freq_hz = float(e.instrument.f_nv(e.apex()))
    for t in (0.0125e-6, 0.025e-6, 0.04e-6):
        assert p0(e, P.rabi(t), "rabi") == pytest.approx(np.cos(np.pi * 20e6 * t) ** 2,
                                                          abs=1e-9)
    e.mw.power_dbm = 20 * np.log10(2.0)                 # twice the Rabi frequency
    e.load(P.rabi(12.5e-9, references=False))
    assert e.expected_counts()[0] == pytest.approx(e.shots * 0.03 * 0.7)
    e.mw.on = False
    assert e.expected_counts()[0] == pytest.approx(e.shots * 0.03)


def test_ramsey_fringes():
    e = engine()
    f_nv = float(e.instrument.f_nv(e.apex()))
    delta = 2e6
    e.mw.freq_hz = f_nv - delta
    amp = ph.rabi_amplitude(delta, 20e6)            # off-resonant pulses lose contrast
    for tau in np.linspace(0.1e-6, 2e-6, 7):
        e.load(P.ramsey(tau, references=False))
        want = 1 - amp * (1 - ph.ramsey_p0(tau, delta, 2e-6))
        assert e.expected_counts()[0] == pytest.approx(ph.expected_counts(want, e.shots))
    e.mw.freq_hz = f_nv
    on_fringe = [p0(e, P.ramsey(k * 0.4e-6, 1 / 0.4e-6), "ramsey") for k in (1, 2, 3)]
    np.testing.assert_allclose(on_fringe, ph.ramsey_p0([0.4e-6, 0.8e-6, 1.2e-6], 0.0),
                               atol=0.02)


def test_echo_decay():
    e = engine()
    e.mw.freq_hz = float(e.instrument.f_nv(e.apex()))
    for tau in (2e-6, 10e-6, 30e-6):
        assert p0(e, P.echo(tau), "echo") == pytest.approx(
            ph.p0_from_coherence(ph.echo_coherence(tau)), abs=1e-9)


def deer_ratio(e, tau):
    """S/E of the DEER program from the expected counts."""
    e.load(P.deer(tau))
    c = dict(zip(e.gate_names, e.expected_counts(), strict=True))
    s = 2 * ph.normalised_population(c["signal"], c["bright"], c["dark"]) - 1
    echo = 2 * ph.normalised_population(c["echo"], c["bright"], c["dark"]) - 1
    return s / echo


def test_deer_single_spin_oscillates_at_its_coupling():
    e = engine({"dark_spins": {"points": [SPIN]}}, apex=(0.0, 0.0, 1000.0))
    inst = e.instrument
    e.mw.freq_hz = float(inst.f_nv(e.apex()))
    spin = e.spins[0]
    f_spin = float(ph.dark_spin_frequency(inst.field_at(spin, e.apex())))
    e.rf.freq_hz, e.rf.on = f_spin, True
    nu = float(ph.dipolar_coupling(spin - inst.nv_position_nm, inst.nv_axis))
    p = float(ph.dark_flip_probability(0.0, 100e-9, 150e-9))
    taus = np.linspace(0.5e-6, 30e-6, 60)
    ratio = np.array([deer_ratio(e, t) for t in taus])
    np.testing.assert_allclose(ratio, 1 - p + p * np.cos(np.pi * nu * taus), atol=1e-9)
    (fit_nu, fit_p), _ = curve_fit(lambda t, f, q: 1 - q + q * np.cos(np.pi * f * t),
                                   taus, ratio, p0=[0.8 * nu, 0.5])
    assert fit_nu == pytest.approx(nu, rel=1e-4)
    e.rf.on = False
    assert deer_ratio(e, 8e-6) == pytest.approx(1.0)
    e.rf.on, e.rf.freq_hz = True, f_spin + 200e6     # far off the spin (Lorentzian tail)
    assert deer_ratio(e, 8e-6) == pytest.approx(1.0, abs=3e-3)


def test_deer_follows_the_tip():
    e = engine({"dark_spins": {"points": [SPIN]}}, apex=(0.0, 0.0, 1000.0))
    inst = e.instrument
    e.rf.on, e.rf.freq_hz = True, inst.f_dark0
    e.mw.freq_hz = float(inst.f_nv(e.apex()))
    far = deer_ratio(e, 8e-6)
    e.move("z", 20.0)                         # the tip shifts the spin off the RF
    e.mw.freq_hz = float(inst.f_nv(e.apex()))
    assert far < 0.5 and deer_ratio(e, 8e-6) == pytest.approx(1.0, abs=1e-3)


def test_unsupported_gates_are_refused():
    laser, read = Pulse("laser", 0, 3e-6), (Pulse("laser", 6e-6, 3e-6),
                                            Pulse("counter", 6e-6, 3e-7))
    mw = [Pulse("mw", 4e-6 + i * 0.3e-6, 25e-9) for i in range(4)]
    cases = [
        ((laser, *mw, *read), "4 MW pulses"),
        ((laser, mw[0], mw[1], Pulse("rf", 4.05e-6, 0.1e-6), *read), "RF is simulated only"),
        ((laser, *mw[:3], Pulse("rf", 4.05e-6, 0.1e-6), *read), "RF is simulated only"),
        ((laser, Pulse("mw", 4e-6, 1e-8, 1e6), Pulse("mw", 4.5e-6, 1e-8, 2e6), *read),
         "share one detuning"),
        ((laser, Pulse("mw", 1e-6, 25e-9), *read), "between the initialising"),
        ((*read, Pulse("mw", 6e-6, 3e-6), Pulse("mw", 1e-6, 1e-8)), "a CW ODMR gate takes"),
    ]
    e = engine()
    for pulses, message in cases:
        with pytest.raises(NvmriError, match=message):
            e.load(Program("bad", (Gate("g", pulses),)))
    with pytest.raises(NvmriError, match="no pulse program"):
        Engine({}).acquire()


def test_faults():
    e = engine({"faults": [{"kind": "frequency_jump", "after_acquisitions": 2, "hz": 2e7},
                           {"kind": "counter_dropout", "after_acquisitions": 3, "count": 2},
                           {"kind": "ioc_pause", "after_acquisitions": 1, "seconds": 0.1}]})
    f_nv = float(e.instrument.f_nv(e.apex()))
    e.mw.freq_hz = round(f_nv, -6)
    det = np.arange(-40e6, 40e6, 0.25e6)
    e.load(P.cw_odmr(det))
    dips = []
    for i in range(6):
        assert [f.kind for f in e.faults_starting("ioc_pause")] == (["ioc_pause"] if i == 1
                                                                     else [])
        dips.append(det[np.argmin(e.expected_counts())])
        counts = e.acquire()
        assert (counts.sum() == 0) == (i in (3, 4))
    assert dips[0] == dips[1] == pytest.approx(f_nv - e.mw.freq_hz, abs=0.25e6)
    inst = e.instrument                  # a field step of hz / gamma_e along the NV axis
    b = inst.field_at(inst.nv_position_nm, e.apex()) + 2e7 / ph.GAMMA_E * inst.nv_axis
    jumped = ph.nv_transition_frequencies(b, inst.nv_axis)[0]
    assert dips[2] == pytest.approx(jumped - e.mw.freq_hz, abs=0.25e6)
    assert dips[2] - dips[0] == pytest.approx(2e7, rel=0.1)
    e.laser_on = False
    assert e.acquire().sum() == 0


def test_time_and_drift():
    e = engine({"tip": {"drift_nm_per_s": [2.0, 0.0, -1.0]},
                "stage": {"velocity_nm_per_s": 100.0}}, apex=(0.0, 0.0, 30.0))
    t_moves = e.time_s
    assert t_moves == pytest.approx((100.0 - 30.0) / 100.0)         # z from 100 to 30
    assert e.move("x", 10.0) == pytest.approx(0.1)
    e.load(P.echo(2e-6))
    e.shots = 100_000
    t0 = e.time_s
    e.acquire()
    assert e.time_s - t0 == pytest.approx(e.shots * P.echo(2e-6).duration)
    np.testing.assert_allclose(e.apex(), [10.0 + 2 * e.time_s, 0.0, 30.0 - e.time_s])
    assert e.stage_ok
    e.time_s = 30.0                                    # the apex drifted to 0 nm: a crash
    assert not e.stage_ok


def test_stage_limits():
    e = engine()
    with pytest.raises(NvmriError, match="below z_min"):
        e.move("z", 4.9)
    with pytest.raises(NvmriError, match="outside"):
        e.move("x", 5000.0)
    assert e.position[2] == 30.0


def test_acquire_is_fast_with_a_layer():
    e = engine("paper-fig3-nv1", apex=(0.0, 0.0, 20.0))
    e.rf.on, e.rf.freq_hz = True, e.instrument.f_dark0
    e.mw.freq_hz = float(e.instrument.f_nv(e.apex()))
    e.load(P.deer(10e-6, lock_detunings=(-4e6, 4e6, 1e8)))
    assert len(e.spins) > 2000
    e.acquire()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        e.acquire()
    assert (time.perf_counter() - t0) / n < 3e-3          # typically ~0.5 ms
