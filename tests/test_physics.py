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


def _fig2a_line(step_nm=0.01):
    """The Fig. 2a y-linecut (x = 0, apex 30 nm): y (nm) and apex positions."""
    y = np.arange(-120.0, 120.0, step_nm)
    return y, np.stack([np.zeros_like(y), y, np.full_like(y, 30.0)], axis=-1)


def test_fig2a_steepest_line_slope_and_ramsey_fringe():
    # physics.md: steepest slope of f(0 -> +1) 6.75 MHz/nm at y = +/-24.6 nm, so
    # tau = 450 ns fringes 3.3 A apart, 2.4 G/nm by the linear-Zeeman formula
    y, apex = _fig2a_line()
    slope = np.abs(np.gradient(INST.f_nv(apex), y))               # Hz/nm
    i = np.argmax(slope)
    assert slope[i] / 1e6 == pytest.approx(6.75, abs=0.01)
    assert abs(y[i]) == pytest.approx(24.6, abs=0.05)
    period_nm = 1.0 / (450e-9 * slope[i])
    assert 10 * period_nm == pytest.approx(3.29, abs=0.005)
    linear_zeeman = ph.gradient_from_spatial_width(450e-9, period_nm) / G_PER_NM
    assert linear_zeeman == pytest.approx(2.41, abs=0.005)


def test_fig2a_ramsey_fringes_on_the_line_are_3_3_angstrom_apart():
    # the fringes themselves (exact Hamiltonian), MW on the line at the steepest point
    y, apex = _fig2a_line(0.002)
    f = INST.f_nv(apex)
    i = np.argmax(np.abs(np.gradient(f, y)))
    near = np.abs(y - y[i]) < 1.0
    p0 = ph.ramsey_p0(450e-9, f[near] - f[i], t2s_s=np.inf)
    crossings = y[near][np.flatnonzero(np.diff(np.sign(p0 - 0.5)))]
    nearest = np.sort(crossings[np.argsort(np.abs(crossings - y[i]))[:3]])
    assert 10 * (nearest[2] - nearest[0]) == pytest.approx(3.3, rel=0.02)   # one period


def test_fig2a_exact_gradient_on_the_line():
    # physics.md: the exact gradient of B_tip . n on that line is 2.84 G/nm
    y, apex = _fig2a_line()
    dy = np.abs(ph.tip_gradient(NV, apex, AXIS)[:, 1]) / G_PER_NM
    assert dy.max() == pytest.approx(2.84, abs=0.005)
    assert abs(y[np.argmax(dy)]) == pytest.approx(27.25, abs=0.05)   # not where f+ is steepest
    i_fplus = np.argmax(np.abs(np.gradient(INST.f_nv(apex), y)))
    assert dy[i_fplus] == pytest.approx(2.81, abs=0.005)
    # the same from both transitions (what the two-transition lock line measures)
    b_par, _ = ph.field_from_transitions(*ph.nv_transition_frequencies(
        INST.field_at(NV, apex), AXIS))
    np.testing.assert_allclose(np.abs(np.gradient(b_par, y))[1:-1] / G_PER_NM, dy[1:-1],
                               atol=1e-3)


def test_fig2a_overview_raster_gradient():
    # largest lateral gradient of B_tip . n on the 50 nm overview plane (moment 4.3e-17)
    xs = np.arange(-60.0, 60.0, 0.5)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    apex = np.stack([x, y, np.full_like(x, 50.0)], axis=-1)
    assert lateral_gradient(apex).max() == pytest.approx(1.98, abs=0.01)


def _fplus_lateral_gradient(apex_nm, h_nm=1e-3):
    """|(d/dx, d/dy) f+| / gamma_e at one apex position, G/nm (f+-equivalent)."""
    p = np.asarray(apex_nm, float)
    steps = h_nm * np.eye(3)[:2]
    d = [(INST.f_nv(p + s) - INST.f_nv(p - s)) / (2 * h_nm) for s in steps]
    return float(np.hypot(*d)) / ph.GAMMA_E / G_PER_NM


def _point_with_gradient(gradient, target_g_per_nm, height_nm):
    """A point on the x axis, outside the maximum (x < -8 nm), where ``gradient`` is the target."""
    return np.array([brentq(lambda x: gradient([x, 0.0, height_nm]) - target_g_per_nm,
                            -48.0, -8.0), 0.0, height_nm])


def test_fig2b_gradients_at_apex_10nm():
    # physics.md: f+-equivalent lateral gradient up to 26 G/nm, exact B_tip . n 21 G/nm
    xs = np.arange(-40.0, 40.0, 0.1)
    apex = np.stack([xs, np.zeros_like(xs), np.full_like(xs, 10.0)], axis=-1)
    assert lateral_gradient(apex).max() == pytest.approx(20.8, abs=0.05)
    f_equiv = [_fplus_lateral_gradient(a) for a in apex[::5]]
    assert max(f_equiv) == pytest.approx(26.2, abs=0.1)


@pytest.mark.parametrize("gradient", [_fplus_lateral_gradient, lateral_gradient])
def test_fig2b_cw_slice_width_where_the_gradient_is_12(gradient):
    # 2.5 A CW slice (tau_cw 120 ns) where the lateral gradient is 12 G/nm: the
    # linear formula, and CW ODMR along the gradient through that point, MW fixed.
    # On the outer flank (x ~ -23 nm) the two gradients agree to 1 %.
    assert 10 * ph.spatial_width(120e-9, 12.0 * G_PER_NM) == pytest.approx(2.48, abs=0.005)
    p = _point_with_gradient(gradient, 12.0, 10.0)
    g = ph.tip_gradient(NV, p, AXIS)
    u = np.array([g[0], g[1], 0.0]) / np.hypot(g[0], g[1])
    t = np.linspace(-1.5, 1.5, 30001)
    f_line = INST.f_nv(p + t[:, None] * u)
    dip = 1.0 - ph.odmr_fluorescence(INST.f_nv(p), f_line, INST.tau_cw_s, INST.contrast_cw)
    inside = t[dip >= dip.max() / 2]
    assert 10 * (inside.max() - inside.min()) == pytest.approx(2.5, rel=0.02)


@pytest.mark.parametrize("height, gauss, shift_mhz",
                         [(50.0, 120.0, 152.0), (30.0, 250.0, 296.0), (10.0, 690.0, 851.0)])
def test_tip_field_and_line_shift_at_nv(height, gauss, shift_mhz):
    # physics.md: "about" 120/250/690 G at the NV (computed: 118.0, 250.7, 688.0 G,
    # i.e. two significant figures); f+ moves by 152/296/851 MHz there
    apex = [0.0, 0.0, height]
    b = ph.tip_field(NV, apex, INST.tip_radius_nm, INST.tip_moment_am2)
    assert np.linalg.norm(b) / 1e-4 == pytest.approx(gauss, abs=2.5)
    assert (INST.f_nv(apex) - INST.f_nv0) / 1e6 == pytest.approx(shift_mhz, abs=0.5)


@pytest.mark.parametrize("height, lo_mhz, hi_mhz", [(50.0, -72.0, 235.0), (10.0, -727.0, 1354.0)])
def test_line_shift_range_over_a_plane(height, lo_mhz, hi_mhz):
    # physics.md: over a +/-100 nm plane -72..+235 MHz (50 nm), -727..+1354 MHz (10 nm)
    xs = np.arange(-100.0, 100.01, 0.5)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    shift = (INST.f_nv(np.stack([x, y, np.full_like(x, height)], -1)) - INST.f_nv0) / 1e6
    assert shift.min() == pytest.approx(lo_mhz, abs=1.0)
    assert shift.max() == pytest.approx(hi_mhz, abs=1.0)


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
