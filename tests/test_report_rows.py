"""Report rows for Fig. 3d (layer coupling rate) and Fig. 4a (quantum SNR gain).

The formulas are checked against independent numerics (orientation average,
direct sums over spins); the report functions against synthetic tip-free
evolutions (tests/reconstruct_synth.py) whose truth is known here.
"""

from __future__ import annotations

import numpy as np
import pytest
import reconstruct_synth as syn

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct import protocol
from nvmri_bluesky.reconstruct.layers import layer_coupling_rate, layer_decay_integral
from nvmri_bluesky.reconstruct.localize import fit_deer_evolution
from nvmri_bluesky.reconstruct.report import fit_echo_decay, snr_gain_report

INST = physics.Instrument()
FIG4_NU_HZ = float(physics.dipolar_coupling([4.0, 5.1, -3.65], INST.nv_axis))


def test_classical_factor_is_the_orientation_average_of_the_quantum_one():
    nu, tau = 117e3, np.linspace(0.0, 30e-6, 31)
    cos_a = np.linspace(-1.0, 1.0, 200001)
    direct = np.trapezoid(np.cos(np.pi * nu * tau[:, None] * cos_a), cos_a, axis=1) / 2.0
    np.testing.assert_allclose(physics.classical_deer_factor(nu, tau), direct, atol=1e-8)


def test_snr_gain_limits_and_fig4_value():
    # no echo decay: 2 / max(1 - sin x / x) = 2 / 1.2172 (x = 4.493, tan x = x)
    assert physics.quantum_snr_gain(117e3, t2_s=1e3, tau_max_s=200e-6, num=200001) \
        == pytest.approx(1.643, abs=0.001)
    # the Fig. 4 spin (117 kHz) with T2 = 20 us, n = 1.5 over 0..30 us
    assert abs(FIG4_NU_HZ) == pytest.approx(117.2e3, rel=1e-3)
    assert physics.quantum_snr_gain(abs(FIG4_NU_HZ)) == pytest.approx(1.92, abs=0.01)
    # the echo decay favours the quantum spin more the weaker its coupling
    assert physics.quantum_snr_gain(50e3) > physics.quantum_snr_gain(117e3) \
        > physics.quantum_snr_gain(500e3)


def test_layer_coupling_rate_is_the_short_time_decay_rate():
    h, n = 10.0, 0.5
    rate = layer_coupling_rate(h, n)
    tau = 0.05 / rate                                     # pi nu tau << 1 for most spins
    assert n * float(layer_decay_integral(tau, h)) == pytest.approx(
        (np.pi * tau * rate) ** 2 / 2, rel=0.02)
    # a direct sum over a fine square lattice of the same density
    step = 0.25
    g = np.arange(-120.0, 120.0, step) + step / 2
    x, y = np.meshgrid(g, g, indexing="ij")
    nu = physics.dipolar_coupling(np.stack([x, y, np.full_like(x, h)], -1), INST.nv_axis)
    assert rate == pytest.approx(physics.rms_coupling(nu, n * step**2), rel=0.01)
    assert layer_coupling_rate(h, 4 * n) == pytest.approx(2 * rate, rel=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_snr_gain_from_a_synthetic_evolution_matches_the_truth(seed):
    rng = np.random.default_rng(seed)
    spin = np.array([4.0, 5.1, -3.65])
    evo = syn.deer_evolution(INST, spin, protocol.EVOLUTION_TAUS_S, protocol.SPIN_SHOTS, rng)
    (t2, n), cov = fit_echo_decay(evo)
    assert abs(t2 - INST.nv_t2_s) < 4 * np.sqrt(cov[0, 0])
    assert abs(n - INST.nv_t2_exponent) < 4 * np.sqrt(cov[1, 1])
    coupling = fit_deer_evolution(evo)
    row = snr_gain_report(evo, coupling.nu_hz, coupling.nu_sigma_hz)
    gain = row["snr_gain_quantum_over_classical"]
    taus = np.asarray(protocol.EVOLUTION_TAUS_S)
    truth = physics.quantum_snr_gain(abs(FIG4_NU_HZ), INST.nv_t2_s, INST.nv_t2_exponent,
                                     tau_min_s=taus.min(), tau_max_s=taus.max())
    assert 0 < gain["sigma"] < 0.1
    assert abs(gain["value"] - truth) < 3 * gain["sigma"]
    assert "classical moment of random orientation" in row["snr_gain_definition"]


def test_fig2b_point_is_where_the_slice_sees_12_gauss_per_nm():
    # a 2 nm lock line along x at apex 10 nm, as the calibration measures it
    from nvmri_bluesky.reconstruct.fig2 import gradient_crossing

    x = np.arange(-60.0, 60.01, 2.0)
    apex = np.stack([x, np.zeros_like(x), np.full_like(x, 10.0)], -1)
    fp, fm = physics.nv_transition_frequencies(INST.field_at(INST.nv_position_nm, apex),
                                               INST.nv_axis)
    b_par, _ = physics.field_from_transitions(fp, fm)
    equiv, exact = np.gradient(fp / physics.GAMMA_E, x) * 1e4, np.gradient(b_par, x) * 1e4
    x_c = gradient_crossing(x, equiv, exact, 12.0)
    p = np.array([x_c, 0.0, 10.0])
    h = 1e-3
    slope = abs(float(INST.f_nv(p + [h, 0, 0]) - INST.f_nv(p - [h, 0, 0]))) / (2 * h)
    width_nm = float(physics.spatial_width(120e-9, slope / physics.GAMMA_E))
    assert 10 * width_nm == pytest.approx(2.5, rel=0.05)      # the paper's 2.5 A slice
    assert x_c < -15.0                                         # the outer flank
