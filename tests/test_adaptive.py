"""Adaptive design (issue 15): the recommender and the fit from lists of points.

Synthetic data from the tip model and the exact Hamiltonian
(``reconstruct_synth``); the recommender and the fit see only the measured
map, the flip line and the counts.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import reconstruct_synth as syn
import xarray as xr

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct import adaptive, protocol
from nvmri_bluesky.reconstruct.lines import FlipLine
from nvmri_bluesky.reconstruct.localize import localize_spins
from nvmri_bluesky.reconstruct.spinmodel import fisher_information

SPIN = np.array([4.0, 5.1, -3.65])          # the paper's Fig. 4 offset, nm
SHOT_S = 174e-6                             # one shot of the per-point DEER program, s


@functools.lru_cache(maxsize=1)
def setup():
    """(inst, detuning, line with a centre sigma, tau, w, survey design)."""
    inst, det, exact = syn.spin_psf_setup(10.0, np.random.default_rng(15))
    line = FlipLine(centre_hz=exact.centre_hz, t2_star_s=exact.t2_star_s,
                    centre_sigma_hz=250e3)
    nu = float(physics.dipolar_coupling(SPIN, inst.nv_axis))
    tau = protocol.choose_tau(abs(nu))
    w = float(physics.deer_weight(nu, tau))
    survey = protocol.design_spin_raster(det, line.centre_hz, tau,
                                         step_nm=protocol.SPIN_SURVEY_STEP_NM)
    return inst, det, line, tau, w, survey


def points_dataset(inst, tips, shots, rf_hz, tau, rng) -> xr.Dataset:
    """DEER counts at a list of tips (any order, repeats) with per-point shots."""
    tips = np.asarray(tips, float)
    s, e = syn._coherences(inst, SPIN, tips, rf_hz, tau, 100e-9)
    counts = syn._counts(inst, s, e, np.asarray(shots, float), rng)
    return xr.Dataset({k: ("point", v) for k, v in counts.items()}
                      | {"shots": ("point", np.asarray(shots, float))},
                      coords={a: ("point", tips[:, i]) for i, a in enumerate("xyz")},
                      attrs={"tau_s": tau, "rf_frequency_hz": rf_hz, "rf_duration_s": 100e-9})


def posterior(sigma_nm, w, shift_sigma_mhz=0.25, mean=SPIN):
    cov = np.diag(np.r_[sigma_nm, 0.1, shift_sigma_mhz]) ** 2
    return adaptive.SpinPosterior(np.r_[mean, w, 0.0], cov, photons_per_shot=0.03,
                                  contrast=0.3, echo=0.78)


def lattice(survey, step=1.0, planes=(30.0, 32.0)):
    xs = np.arange(survey.x[0], survey.x[1] + 1e-9, step)
    ys = np.arange(survey.y[0], survey.y[1] + 1e-9, step)
    g = np.stack(np.meshgrid(xs, ys, planes, indexing="ij"), -1)
    return g.reshape(-1, 3)


# --------------------------------------------------------------------------- #
# the recommender
# --------------------------------------------------------------------------- #

def test_scores_are_the_fit_fisher_information():
    """N u u^T summed over a raster is the spin and shift block of fisher_information."""
    inst, det, line, tau, w, survey = setup()
    rng = np.random.default_rng(1)
    tips = lattice(survey, step=4.0, planes=(30.0,))
    ds = points_dataset(inst, tips, np.full(len(tips), 2e5), survey.rf_frequency_hz, tau, rng)
    fi = fisher_information(ds, det, line, SPIN, w, 0.03, 0.3, 0.78)
    u = adaptive.per_shot_scores(tips, np.r_[SPIN, w, 0.0], det, line,
                                 survey.rf_frequency_hz, 0.03, 0.3, 0.78)
    f = 2e5 * u.T @ u
    assert f[0, 0] > 0
    # spins are the last four parameters; the line shift follows the 3 nuisances
    np.testing.assert_allclose(fi[-4:, -4:], f[:4, :4], rtol=1e-9, atol=1e-12 * f[0, 0])
    np.testing.assert_allclose(fi[3, -4:], f[4, :4], rtol=1e-9, atol=1e-12 * f[0, 0])
    assert fi[3, 3] == pytest.approx(f[4, 4] + 1.0 / 0.25**2, rel=1e-9)


def test_recommends_the_ring_flanks_of_a_narrow_posterior():
    """A well-localised spin: every chosen point sits on a flank of its resonant ring
    (PSF 30-95 % of its peak, the steepest part of the line), none far off it, and the
    batch beats the same instrument time spread over the window."""
    inst, det, line, tau, w, survey = setup()
    cand = lattice(survey, step=0.5)
    post = posterior([0.15, 0.15, 0.05], w)
    rec = adaptive.recommend(post, cand, det, line, survey.rf_frequency_hz, SHOT_S, batch=12,
                             rng=3)
    assert rec.tips.shape == (12, 3) and np.all(rec.shots == 50_000)
    rel = line.probability(survey.rf_offset_hz - det(rec.tips - SPIN)) / line.peak
    assert np.all((rel > 0.3) & (rel < 0.95)), rel
    # the lattice itself is mostly far from the ring
    rel_all = line.probability(survey.rf_offset_hz - det(cand - SPIN)) / line.peak
    assert np.mean(rel_all > 0.3) < 0.1
    # predicted sigma: smaller than before, and better than uniform random points
    assert np.all(rec.predicted_sigma_nm < rec.prior_sigma_nm)
    rng = np.random.default_rng(0)
    uniform = cand[rng.choice(len(cand), 12, replace=False)]
    u = adaptive.per_shot_scores(uniform, post.mean, det, line, survey.rf_frequency_hz,
                                 0.03, 0.3, 0.78)
    cov = np.linalg.inv(np.linalg.inv(post.covariance) + 50_000 * u.T @ u)
    assert np.all(rec.predicted_sigma_nm < 0.7 * np.sqrt(np.diag(cov)[:3]))
    assert rec.instrument_s == pytest.approx(12 * 50_000 * SHOT_S)


def test_wide_posterior_spreads_over_the_rings_it_allows():
    """With a 1 nm posterior the batch covers more of the window than with 0.15 nm, and
    still only points where some posterior draw rings."""
    inst, det, line, tau, w, survey = setup()
    cand = lattice(survey, step=1.0)
    narrow = adaptive.recommend(posterior([0.15, 0.15, 0.05], w), cand, det, line,
                                survey.rf_frequency_hz, SHOT_S, batch=16, rng=3)
    wide = adaptive.recommend(posterior([1.0, 1.0, 0.4], w), cand, det, line,
                              survey.rf_frequency_hz, SHOT_S, batch=16, rng=3)
    rel_narrow = line.probability(survey.rf_offset_hz - det(narrow.tips - SPIN)) / line.peak
    rel_wide = line.probability(survey.rf_offset_hz - det(wide.tips - SPIN)) / line.peak
    assert np.std(rel_wide) > np.std(rel_narrow)
    samples = wide.details["samples"][:, :3]
    best = np.max(line.probability(survey.rf_offset_hz - det(wide.tips[:, None] - samples))
                  / line.peak, axis=1)
    assert np.all(best > 0.3)
    assert np.all(wide.predicted_sigma_nm < wide.prior_sigma_nm)


def test_shots_follow_the_overhead_and_met_axes_lose_weight():
    inst, det, line, tau, w, survey = setup()
    cand = lattice(survey, step=1.0)
    post = posterior([0.3, 0.3, 0.1], w)
    free = adaptive.recommend(post, cand, det, line, survey.rf_frequency_hz, SHOT_S, batch=4,
                              rng=1)
    slow = adaptive.recommend(post, cand, det, line, survey.rf_frequency_hz, SHOT_S, batch=4,
                              overhead_s=60.0, rng=1)
    assert np.all(free.shots == 50_000) and np.all(slow.shots > 50_000)
    # a loose vertical target: the lateral axes gain more than with the default target
    lateral = adaptive.recommend(post, cand, det, line, survey.rf_frequency_hz, SHOT_S,
                                 batch=8, target_sigma_nm=(0.3, 0.3, 5.0), rng=1)
    default = adaptive.recommend(post, cand, det, line, survey.rf_frequency_hz, SHOT_S,
                                 batch=8, rng=1)
    assert np.sum(lateral.predicted_sigma_nm[:2] ** 2) < np.sum(default.predicted_sigma_nm[:2]
                                                                ** 2)
    assert lateral.predicted_sigma_nm[2] > default.predicted_sigma_nm[2]


def test_recommend_refuses_nothing_to_learn():
    inst, det, line, tau, w, survey = setup()
    far = np.array([[survey.x[0], survey.y[0], 30.0]] * 3)   # a corner: no ring there
    with pytest.raises(NvmriError, match="no candidate carries information"):
        adaptive.recommend(posterior([0.1, 0.1, 0.05], w), far, det, line,
                           survey.rf_frequency_hz, SHOT_S)
    assert not adaptive.target_reached([0.31, 0.1, 0.01])
    assert adaptive.target_reached([0.3, 0.3, 0.05])


# --------------------------------------------------------------------------- #
# the fit from lists of points
# --------------------------------------------------------------------------- #

def test_points_repeated_and_varying_shots_are_their_sum():
    """Fisher information of a list of points: repeats add, shots per point count, and a
    grid given as a list of points is the grid."""
    inst, det, line, tau, w, survey = setup()
    rng = np.random.default_rng(2)
    tips = lattice(survey, step=8.0, planes=(30.0,))[:12]
    twice = points_dataset(inst, np.r_[tips, tips], np.r_[np.full(12, 3e4), np.full(12, 7e4)],
                           survey.rf_frequency_hz, tau, rng)
    once = points_dataset(inst, tips, np.full(12, 1e5), survey.rf_frequency_hz, tau, rng)
    args = (det, line, SPIN, w, 0.03, 0.3, 0.78)
    np.testing.assert_allclose(fisher_information(twice, *args), fisher_information(once, *args),
                               rtol=1e-9)
    grid = syn.deer_raster(inst, SPIN, *survey.axes(), survey.rf_frequency_hz, tau, 1e5, rng)
    flat = grid.stack(point=("x", "y", "z")).reset_index("point")
    assert "x" in flat.coords and flat["signal"].dims == ("point",)
    np.testing.assert_allclose(fisher_information(flat, *args), fisher_information(grid, *args),
                               rtol=1e-9)


def test_localize_from_survey_and_recommended_points():
    """A low-shot survey, then one recommended batch measured at irregular, repeated points
    with varying shots: the joint fit uses every point, lands within 3 sigma of the truth
    and reaches about the sigma the recommender predicted."""
    inst, det, line, tau, w, survey = setup()
    rng = np.random.default_rng(4)
    grid = syn.deer_raster(inst, SPIN, *survey.axes(), survey.rf_frequency_hz, tau, 40_000, rng)
    first = localize_spins(grid, det, line)
    assert len(first.spins) == 1
    post = adaptive.posterior_from_fit(first)
    np.testing.assert_allclose(post.sigma[:3], first.spins[0].offset_sigma_nm, rtol=1e-12)
    np.testing.assert_allclose(post.mean[:3], first.spins[0].offset_nm)
    samples = post.samples(24, np.random.default_rng(0))
    cand = adaptive.candidate_tips(det, line, survey.rf_frequency_hz, samples[:, :3],
                                   [30.0, 32.0], step_nm=0.5)
    rec = adaptive.recommend(post, cand, det, line, survey.rf_frequency_hz, SHOT_S, batch=24,
                             min_shots=50_000, rng=0)
    shots = rec.shots.copy()
    shots[::3] *= 2                                    # varying shots
    tips = np.r_[rec.tips, rec.tips[:4]]               # and repeats
    shots = np.r_[shots, shots[:4]]
    pts = points_dataset(inst, tips, shots, survey.rf_frequency_hz, tau, rng)
    joint = localize_spins([pts, grid], det, line)     # the grid need not come first
    assert joint.n_points == grid.sizes["x"] * grid.sizes["y"] + len(tips)
    assert joint.nuisance.shape == (2, 3)
    fit = joint.spins[0]
    err = fit.offset_nm - SPIN
    assert np.all(np.abs(err) <= 3.0 * fit.offset_sigma_nm), (err, fit.offset_sigma_nm)
    assert np.all(fit.offset_sigma_nm < 0.6 * first.spins[0].offset_sigma_nm)
    # the predicted sigma (for the recommended shots, fewer than measured) bounds the fit's
    assert np.all(fit.offset_sigma_nm < 1.3 * rec.predicted_sigma_nm)
    with pytest.raises(NvmriError, match="on a tip grid"):
        localize_spins(pts, det, line)


def test_posterior_block_is_found_from_the_end_of_the_parameters():
    """Two spins (reported strongest first, fitted in the other order) and one more global
    parameter after the line shift (e.g. a fitted T2*): the right blocks are taken."""
    from types import SimpleNamespace

    n_sets, n_global = 2, 3 * 2 + 2                      # (a, C, E) x 2, shift, log T2*
    sig = np.r_[np.full(n_global, 0.5), [0.11, 0.12, 0.13, 0.14], [0.21, 0.22, 0.23, 0.24]]
    sig[3 * n_sets] = 0.31                                # the line shift, MHz
    cov = np.diag(sig**2)
    cov[3 * n_sets, -2] = cov[-2, 3 * n_sets] = 0.01      # shift x dz of the second fitted
    strong = SimpleNamespace(offset_nm=np.array([1.0, 2.0, 3.0]), weight=1.5,
                             offset_sigma_nm=np.array([0.21, 0.22, 0.23]), weight_sigma=0.24)
    weak = SimpleNamespace(offset_nm=np.array([4.0, 5.0, 6.0]), weight=0.5,
                           offset_sigma_nm=np.array([0.11, 0.12, 0.13]), weight_sigma=0.14)
    result = SimpleNamespace(spins=(strong, weak), covariance=cov, line_shift_hz=2e5,
                             nuisance=np.array([[0.03, 0.3, 0.8], [0.031, 0.29, 0.7]]))
    post = adaptive.posterior_from_fit(result)
    np.testing.assert_allclose(post.mean, [1.0, 2.0, 3.0, 1.5, 0.2])
    np.testing.assert_allclose(post.sigma, [0.21, 0.22, 0.23, 0.24, 0.31])
    assert post.covariance[2, 4] == pytest.approx(0.01)
    assert (post.photons_per_shot, post.contrast, post.echo) == (0.031, 0.29, 0.7)
    other = adaptive.posterior_from_fit(result, spin=1)
    np.testing.assert_allclose(other.sigma[:4], [0.11, 0.12, 0.13, 0.14])
    assert other.covariance[2, 4] == 0.0
