"""physics.py reproduces the calibration numbers of reference/physics.md."""

import numpy as np
import pytest
from scipy.optimize import brentq, curve_fit

from nvmri_bluesky import physics as ph

INST = ph.Instrument()
NV = INST.nv_position_nm
AXIS = INST.nv_axis
G_PER_NM = 1e-4          # T/nm per G/nm


def lateral_gradient(apex_nm):
    """|(d/dx, d/dy) (B_tip . n)| at the NV for apex positions (..., 3), G/nm."""
    g = ph.tip_gradient(NV, apex_nm, AXIS, INST.tip_radius_nm, INST.tip_moment_am2)
    return np.hypot(g[..., 0], g[..., 1]) / G_PER_NM


def test_fig2a_linecut_gradient_and_ramsey_fringe():
    y = np.arange(-120.0, 120.0, 0.05)
    apex = np.stack([np.zeros_like(y), y, np.full_like(y, 30.0)], axis=-1)
    dy = np.abs(ph.tip_gradient(NV, apex, AXIS)[:, 1]) / G_PER_NM
    i = np.argmax(dy)
    assert dy[i] == pytest.approx(2.4, rel=0.05)
    assert abs(y[i]) == pytest.approx(27.0, abs=1.0)         # +/- y by symmetry
    fringe_angstrom = 10 * ph.spatial_width(450e-9, dy[i] * G_PER_NM)
    assert fringe_angstrom == pytest.approx(3.3, rel=0.10)


def test_fig2a_overview_raster_gradient():
    xs = np.arange(-60.0, 60.0, 0.5)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    apex = np.stack([x, y, np.full_like(x, 50.0)], axis=-1)
    assert lateral_gradient(apex).max() == pytest.approx(1.7, rel=0.05)


def _point_with_gradient(target_g_per_nm, height_nm):
    """A point on the x axis (x < 0 side of the maximum) whose lateral gradient is the target."""
    x0 = -8.0                                    # where the 10 nm gradient peaks
    return np.array([brentq(lambda x: lateral_gradient([x, 0.0, height_nm]) - target_g_per_nm,
                            x0 - 40.0, x0), 0.0, height_nm])


def test_fig2b_gradient_and_cw_slice_width():
    xs = np.arange(-40.0, 40.0, 0.25)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    apex = np.stack([x, y, np.full_like(x, 10.0)], axis=-1)
    assert lateral_gradient(apex).max() > 12.0
    assert 10 * ph.spatial_width(120e-9, 12.0 * G_PER_NM) == pytest.approx(2.5, rel=0.10)

    # The same from CW ODMR along the gradient through a 12 G/nm point, MW fixed.
    p = _point_with_gradient(12.0, 10.0)
    g = ph.tip_gradient(NV, p, AXIS)
    u = np.array([g[0], g[1], 0.0]) / np.hypot(g[0], g[1])
    t = np.linspace(-1.5, 1.5, 30001)
    f_line = INST.f_nv(p + t[:, None] * u)
    dip = 1.0 - ph.odmr_fluorescence(INST.f_nv(p), f_line, INST.tau_cw_s, INST.contrast_cw)
    inside = t[dip >= dip.max() / 2]
    fwhm_angstrom = 10 * (inside.max() - inside.min())
    assert fwhm_angstrom == pytest.approx(2.5, rel=0.10)


def test_tip_field_magnitudes_at_nv():
    for height, gauss in ((50.0, 100.0), (10.0, 580.0)):
        b = ph.tip_field(NV, [0.0, 0.0, height], INST.tip_radius_nm, INST.tip_moment_am2)
        assert np.linalg.norm(b) / 1e-4 == pytest.approx(gauss, rel=0.03)


def test_transition_frequency_at_b0():
    f_plus, f_minus = ph.nv_transition_frequencies(0.12 * AXIS, AXIS)
    assert f_plus == pytest.approx(6.23e9, rel=1e-3)
    assert f_plus == pytest.approx(ph.D_ZFS + ph.GAMMA_E * 0.12, rel=1e-12)
    assert f_minus == pytest.approx(ph.D_ZFS - ph.GAMMA_E * 0.12, rel=1e-9)
    assert INST.f_nv0 == pytest.approx(f_plus)


@pytest.mark.parametrize("b_par", [0.02, 0.05, 0.12, 0.2])
def test_field_from_transitions_inverts_the_hamiltonian(b_par):
    rng = np.random.default_rng(1)
    perp = np.cross(AXIS, [0.0, 1.0, 0.0])
    perp /= np.linalg.norm(perp)
    b_perp = rng.uniform(0.0, 0.01, 20)
    fields = b_par * AXIS + b_perp[:, None] * perp
    got_par, got_perp = ph.field_from_transitions(*ph.nv_transition_frequencies(fields, AXIS))
    np.testing.assert_allclose(got_par, b_par, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got_perp, b_perp, rtol=1e-5, atol=1e-8)


def test_single_spin_deer_oscillates_at_its_coupling():
    offset = np.array([4.0, 5.1, -3.65])                    # Fig. 4
    nu = float(ph.dipolar_coupling(offset, AXIS))
    tau = np.linspace(0.2e-6, 40e-6, 400)
    s = ph.deer_coherence(tau, np.ones((tau.size, 1)), [nu]) / ph.echo_coherence(tau)
    (fit,), _ = curve_fit(lambda t, f: np.cos(np.pi * f * t), tau, s, p0=[0.9 * nu])
    assert fit == pytest.approx(nu, rel=1e-4)
    spectrum = np.abs(np.fft.rfft(s - s.mean(), 1 << 16))
    freqs = np.fft.rfftfreq(1 << 16, tau[1] - tau[0])
    assert freqs[np.argmax(spectrum)] == pytest.approx(nu / 2, rel=0.02)   # cos(pi nu tau)


def test_tip_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    points = rng.uniform([-20, -20, -15], [20, 20, 0], (10, 3))
    apex = np.array([3.0, -7.0, 25.0])
    h = 1e-3
    grad = ph.tip_gradient(points, apex, AXIS)
    for k in range(3):
        step = np.zeros(3)
        step[k] = h
        fd = (ph.tip_field(points + step, apex) @ AXIS
              - ph.tip_field(points - step, apex) @ AXIS) / (2 * h)
        np.testing.assert_allclose(grad[:, k], fd, rtol=1e-6, atol=1e-12)


def test_tip_field_broadcasts():
    pts = np.zeros((4, 1, 3)) + NV
    apex = np.stack([np.zeros(5), np.linspace(-10, 10, 5), np.full(5, 20.0)], -1)
    b = ph.tip_field(pts, apex)
    assert b.shape == (4, 5, 3)
    np.testing.assert_allclose(b[0, 2], ph.tip_field(NV, apex[2]))


def test_drive_and_readout_helpers():
    assert ph.rabi_from_power(0.0) == pytest.approx(20e6)
    assert ph.rabi_from_power(20 * np.log10(2.0)) == pytest.approx(40e6)
    assert ph.rabi_amplitude(0.0, 20e6) == 1.0
    assert ph.rabi_amplitude(20e6, 20e6) == pytest.approx(0.5)
    # the Rabi formula's amplitude is this factor
    eff = np.hypot(20e6, 5e6)
    assert ph.rabi_flip_probability(5e6, 20e6, 0.5 / eff) == pytest.approx(
        ph.rabi_amplitude(5e6, 20e6))
    assert ph.cw_counts(6e9, 6e9, 1000, 3e-6) == pytest.approx(1000 * 0.3 * (1 - 0.15))
    assert ph.cw_counts(np.inf, 6e9, 1000, 3e-6) == pytest.approx(300.0)
    np.testing.assert_allclose(ph.apex_with_drift([1.0, 2.0, 30.0], [0.5, 0.0, -1.0], 2.0),
                               [2.0, 2.0, 28.0])
