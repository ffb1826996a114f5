"""PSF from measured maps: exact dark frequency, interpolant, line fits, PSF values."""

from __future__ import annotations

import numpy as np
import pytest
import reconstruct_synth as syn
import xarray as xr

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct import protocol
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant, dark_detuning_map
from nvmri_bluesky.reconstruct.lines import (
    FlipLine,
    fit_deer_spectrum,
    fit_flip_line,
    fit_lorentzian,
)
from nvmri_bluesky.reconstruct.psf import DarkSpinPSF, feasible_offset_box

INST = syn.instrument(10.0)


FINE_MAP = {"x": (-32.0, 72.0, 27), "y": (-48.0, 48.0, 25), "z": (25.0, 40.0, 6)}
"""A finely sampled map (4 nm lateral, 3 nm vertical) for the interpolant's own tests."""


@pytest.fixture(scope="module")
def psf_map() -> xr.Dataset:
    m = FINE_MAP
    return syn.psf_map(INST, np.linspace(*m["x"]), np.linspace(*m["y"]), np.linspace(*m["z"]),
                       np.random.default_rng(0))


def test_protocol_map_grid_places_spins_to_picometres():
    """The protocol's (coarser) map grid: spline error in position units, noise-free."""
    err_nm = syn.map_spline_error_nm(protocol.SPIN_PSF_MAP, [-25, -40, 28], [60, 40, 37], 2)
    assert np.sqrt(np.mean(err_nm**2)) < 0.01 and err_nm.max() < 0.03


@pytest.fixture(scope="module")
def detuning(psf_map) -> DetuningInterpolant:
    return DetuningInterpolant.from_map(dark_detuning_map(psf_map))




def test_two_transitions_give_the_dark_frequency_exactly(psf_map):
    det = dark_detuning_map(psf_map)
    gx, gy, gz = xr.broadcast(det["x"], det["y"], det["z"])
    pts = np.stack([gx.values, gy.values, gz.values], -1)
    err = det.values - syn.exact_dark_detuning(pts)
    assert np.sqrt(np.mean(err**2)) < 60e3                      # lock noise is 30 kHz
    # the ms=0->+1 shift alone is far off near the tip (the reason for two transitions)
    with pytest.warns(UserWarning):
        approx = dark_detuning_map(psf_map.drop_vars("lock_f_minus"))
    assert np.max(np.abs(approx.values - syn.exact_dark_detuning(pts))) > 20e6


def test_interpolant_values_gradient_and_domain(detuning):
    rng = np.random.default_rng(1)
    pts = rng.uniform([-20, -30, 27], [60, 30, 38], (500, 3))
    assert np.sqrt(np.mean((detuning(pts) - syn.exact_dark_detuning(pts)) ** 2)) < 60e3
    h, dark = 1e-3, syn.exact_dark_detuning
    fd = np.stack([(dark(pts + h * e) - dark(pts - h * e)) / (2 * h)
                   for e in np.eye(3)], -1)
    g = detuning.gradient(pts)
    assert np.median(np.linalg.norm(g - fd, axis=-1) / np.linalg.norm(fd, axis=-1)) < 5e-3
    v, g2 = detuning.value_and_gradient(pts)
    np.testing.assert_allclose(v, detuning(pts))
    np.testing.assert_allclose(g2, g)
    outside = np.array([[0.0, 0.0, 50.0], [200.0, 0.0, 30.0]])
    assert np.all(np.isnan(detuning(outside)))
    assert np.all(np.isnan(detuning.gradient(outside)))


def test_values_at_tip_minus_offset_grid_equal_the_pointwise_spline(detuning):
    """``at_offsets`` (the matched filter's tensor-product evaluation) gives the spline's
    values at every tip - offset to rounding, NaN where they leave the map."""
    rng = np.random.default_rng(2)
    tips = np.stack(np.meshgrid(np.linspace(-10, 30, 7), np.linspace(-20, 20, 6), [30.0, 34.0],
                                indexing="ij"), -1).reshape(-1, 3)
    tips = tips[rng.permutation(len(tips))[:60]]                  # not a full grid
    axes = [np.linspace(-25, 25, 11), np.linspace(-35, 30, 9), np.linspace(-6, 12, 5)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    want = detuning(tips[None, :, :] - grid[:, None, :])
    got = detuning.at_offsets(tips, axes)
    assert got.shape == (len(grid), len(tips))
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).any()
    ok = np.isfinite(want)
    assert ok.mean() > 0.3
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-13, atol=1e-6)


def test_nan_locks_are_filled_or_refused(psf_map):
    det = dark_detuning_map(psf_map)
    holed = det.copy()
    holed[3, 4, 2] = np.nan
    assert np.isfinite(DetuningInterpolant.from_map(holed)([[-20.0, -32.0, 31.0]])).all()
    bad = det.copy()
    bad[:, :10, :] = np.nan
    with pytest.raises(NvmriError):
        DetuningInterpolant.from_map(bad)


def test_a_map_that_stopped_after_three_planes_still_interpolates(psf_map):
    """A map whose descent stopped after 3 planes (a shallow NV's layer map): the spline
    continues the parabola through them: a map quadratic in z comes back as closely as
    from 4 planes (2e-4 relative: the padded spline's own error), and a real one stays
    close to the physics between its planes."""
    x, y, z = (np.linspace(*FINE_MAP[a]) for a in "xyz")
    gx, gy, gz = np.meshgrid(x, y, z[:3], indexing="ij")
    quadratic = xr.DataArray(1e6 * (1 + 0.01 * gx - 0.02 * gy + 0.003 * gz**2),
                             dims=("x", "y", "z"), coords={"x": x, "y": y, "z": z[:3]})
    three = DetuningInterpolant.from_map(quadratic)
    pts = np.random.default_rng(2).uniform([-20, -30, z[0]], [60, 30, z[2]], (200, 3))
    expected = 1e6 * (1 + 0.01 * pts[:, 0] - 0.02 * pts[:, 1] + 0.003 * pts[:, 2]**2)
    np.testing.assert_allclose(three(pts), expected, rtol=5e-4)
    real = DetuningInterpolant.from_map(dark_detuning_map(psf_map).isel(z=slice(3, 6)))
    pts[:, 2] = np.random.default_rng(3).uniform(z[3], z[5], len(pts))
    assert np.sqrt(np.mean((real(pts) - syn.exact_dark_detuning(pts)) ** 2)) < 60e3
    with pytest.raises(NvmriError, match="at least 3 points"):
        DetuningInterpolant.from_map(quadratic.isel(z=slice(0, 2)))


def test_psf_equals_physics_and_feasible_box(detuning):
    line = FlipLine(centre_hz=INST.f_dark0)
    psf = DarkSpinPSF(detuning, line, INST.f_dark0 + 300e6)
    rng = np.random.default_rng(2)
    pts = rng.uniform([0, -20, 28], [40, 20, 36], (2000, 3))
    exact = physics.dark_spin_psf(syn.exact_dark_detuning(pts), 300e6)
    assert np.max(np.abs(psf(pts) - exact)) < 0.02
    v, g = psf.value_and_gradient(pts)
    h = 1e-4
    fd = (psf(pts + [h, 0, 0]) - psf(pts - [h, 0, 0])) / (2 * h)
    big = np.abs(fd) > 0.05
    assert np.median(np.abs(g[big, 0] - fd[big]) / np.abs(fd[big])) < 0.05
    tips = np.array([[-10.0, -20.0, 30.0], [50.0, 20.0, 30.0]])
    box = feasible_offset_box(tips, detuning, [[-8, 8], [-8, 8], [-6, 2]])
    np.testing.assert_allclose(box, [[-8, 8], [-8, 8], [-6, 2]])
    box = feasible_offset_box(tips, detuning)
    assert box[2, 0] == pytest.approx(30 - 40) and box[2, 1] == pytest.approx(30 - 25)


def test_lorentzian_fit_recovers_parameters():
    rng = np.random.default_rng(3)
    f = np.linspace(-30e6, 30e6, 121)
    y = 0.02 + 0.4 * physics.lorentzian(f - 1.5e6, 8e6) + 0.01 * rng.standard_normal(f.size)
    fit = fit_lorentzian(f, y, np.full(f.size, 0.01))
    assert abs(fit.centre_hz - 1.5e6) < 3 * fit.centre_sigma_hz
    assert abs(fit.fwhm_hz - 8e6) < 3 * fit.fwhm_sigma_hz
    assert abs(fit.amplitude - 0.4) < 3 * fit.amplitude_sigma


def _fig4_spectrum(seed: int) -> tuple[xr.Dataset, float]:
    """The Fig. 4 spin's tip-free spectrum at its tau, and its coupling (Hz)."""
    spin = np.array([4.0, 5.1, -3.65])
    nu = float(physics.dipolar_coupling(spin, INST.nv_axis))
    rf = INST.f_dark0 + np.linspace(-40e6, 40e6, 81)
    return syn.deer_spectrum(INST, spin, rf, protocol.choose_tau(abs(nu)),
                             protocol.SPECTRUM_SHOTS, np.random.default_rng(seed)), nu


@pytest.mark.parametrize("seed", [4, 5])
def test_spectrum_fit_recovers_the_line(seed):
    ds, _ = _fig4_spectrum(seed)
    lor, line = fit_deer_spectrum(ds)
    assert abs(line.centre_hz - INST.f_dark0) < 3 * line.centre_sigma_hz
    assert line.centre_sigma_hz < 0.6e6
    assert abs(line.t2_star_s - INST.dark_t2_star_s) < 3 * line.t2_star_sigma_s
    assert abs(lor.centre_hz - INST.f_dark0) < 3 * lor.centre_sigma_hz
    assert 10e6 < lor.fwhm_hz < 16e6                      # pulse-broadened line


@pytest.mark.parametrize("seed", [4, 5])
def test_spectrum_of_two_strong_spins_is_fitted_with_their_known_weights(seed):
    """Two spins of ~1.35 MHz at the tau that flips both fully (w ~ 2, validate seed 52):
    the line is flat-topped.  Read as one spin its T2* comes out far too short; with the
    evolution's couplings in the run's attrs (the protocol writes them) the line is right."""
    rng = np.random.default_rng(seed)
    spins = np.array([[1.45, 1.322, -2.724], [-0.142, 3.096, -0.890]])
    inst = syn.instrument(14.931)
    nu = physics.dipolar_coupling(spins, inst.nv_axis)
    tau = protocol.choose_tau(float(np.abs(nu).max()))
    assert np.all(physics.deer_weight(nu, tau) > 1.9)
    rf = inst.f_dark0 + np.linspace(-40e6, 40e6, 81)
    ds = syn.deer_spectrum(inst, spins, rf, tau, protocol.SPECTRUM_SHOTS, rng)
    _, alone = fit_deer_spectrum(ds)
    assert alone.t2_star_s < inst.dark_t2_star_s - 5 * alone.t2_star_sigma_s   # the old fault
    ds.attrs["point_couplings_hz"] = tuple(np.abs(nu))
    _, line = fit_deer_spectrum(ds)
    assert abs(line.t2_star_s - inst.dark_t2_star_s) < 3 * line.t2_star_sigma_s
    assert abs(line.centre_hz - inst.f_dark0) < 3 * line.centre_sigma_hz
    assert abs(line.amplitude - 1.0) < 3 * line.amplitude_sigma
    # the evolution saw one coupling for both (unresolved): two spins sharing it fit better
    ds.attrs["point_couplings_hz"] = (float(np.abs(nu).mean()),)
    _, shared = fit_deer_spectrum(ds)
    assert abs(shared.t2_star_s - inst.dark_t2_star_s) < 3 * shared.t2_star_sigma_s


def test_one_spin_keeps_the_one_spin_line():
    """A single spin with its coupling in the attrs: its amplitude stays within its w,
    and the line is the one-spin fit's, value for value."""
    ds, nu = _fig4_spectrum(4)
    _, plain = fit_deer_spectrum(ds)
    ds.attrs["point_couplings_hz"] = (abs(nu),)
    assert fit_deer_spectrum(ds)[1] == plain


def test_flip_line_fit_on_contrast():
    rng = np.random.default_rng(6)
    f = INST.f_dark0 + np.linspace(-40e6, 40e6, 161)
    c = 1.6 * physics.dark_flip_probability(f - INST.f_dark0, 100e-9, 150e-9)
    line = fit_flip_line(f, c + 0.02 * rng.standard_normal(f.size), np.full(f.size, 0.02),
                         100e-9)
    assert abs(line.centre_hz - INST.f_dark0) < 3 * line.centre_sigma_hz
    assert abs(line.t2_star_s - 150e-9) < 3 * line.t2_star_sigma_s
    assert abs(line.amplitude - 1.6) < 3 * line.amplitude_sigma
    assert line.fwhm_hz == pytest.approx(11.94e6, rel=0.05)


def test_a_fit_whose_fisher_matrix_is_not_finite_has_nan_sigmas_not_a_crash():
    """Validate seed 62 (a 0.93 /nm^2 layer 6.7 nm above the NV): the layer spectrum's width
    went to its bound 0, the Fisher matrix held inf, and the SVD of its pseudo-inverse
    raised LinAlgError through the whole demo.  Not determined is the honest answer."""
    from nvmri_bluesky.reconstruct._poisson import PoissonFit

    fisher = np.array([[1.0, np.inf], [np.inf, np.nan]])
    fit = PoissonFit(theta=np.zeros(2), fisher=fisher, deviance=1.0, pearson=1.0, n_obs=10)
    assert np.all(np.isnan(fit.sigma()))
