"""Fig. 2 analyses against ground truth: fringe period, CW slice, field gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reconstruct_synth as syn

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct.fig2 import (
    cw_slice_fwhm,
    field_gradient_map,
    fringe_gradient,
    ramsey_local_periods,
    shortest_fringe_period,
)
from nvmri_bluesky.reconstruct.report import (
    gradient_report,
    quantity,
    ramsey_report,
    slice_report,
)

INST = syn.instrument(10.0)


def _line(y, z):
    return np.stack([np.zeros_like(y), y, np.full_like(y, z)], -1)


def test_ramsey_shortest_period_and_gradient():
    rng = np.random.default_rng(0)
    y = np.arange(-40.0, -15.0, 0.04)
    tau = 450e-9
    f_plus = INST.f_nv(_line(y, 30.0))
    p0 = physics.ramsey_p0(tau, f_plus - f_plus.mean(), INST.nv_t2_star_s)
    shots = 200_000

    def counts(p):
        return rng.poisson(physics.expected_counts(p, shots)).astype(float)

    pop = physics.normalised_population(counts(p0), counts(np.ones_like(p0)),
                                        counts(np.zeros_like(p0)))
    periods = ramsey_local_periods(y, pop)
    period, sigma, _ = shortest_fringe_period(periods)
    truth = 1.0 / (tau * np.max(np.abs(np.gradient(f_plus, y))))
    assert abs(period - truth) < max(3 * sigma, 0.01 * truth)
    g, sg = fringe_gradient(period, sigma, tau)
    g_true = np.max(np.abs(np.gradient(f_plus, y))) / physics.GAMMA_E * 1e4
    assert abs(g - g_true) < max(3 * sg, 0.01 * g_true)
    rep = ramsey_report(periods, tau)
    assert rep["ramsey_fringe_period_nm"]["value"] == pytest.approx(period)


def test_field_gradient_from_two_transitions():
    rng = np.random.default_rng(1)
    y = np.arange(-40.0, -14.0, 0.5)
    pm = syn.psf_map(INST, [0.0], y, [30.0], rng, lock_noise_hz=1e3)
    grads = field_gradient_map(pm, along="y")
    b = INST.field_at(INST.nv_position_nm, _line(y, 30.0)) @ INST.nv_axis
    truth = np.gradient(b, y) * 1e4
    np.testing.assert_allclose(grads["dbpar"].values.ravel(), truth, atol=0.02)
    # fringes (f+) and the field along the axis disagree here, as they should
    assert np.max(np.abs(grads["dfplus_equiv"])) < 0.95 * np.max(np.abs(grads["dbpar"]))
    q = gradient_report(grads["dbpar"].values)
    assert q["value"] == pytest.approx(np.max(np.abs(truth)), rel=0.02)   # Fig. 2a: 2.39 G/nm


def test_cw_slice_fwhm():
    rng = np.random.default_rng(2)
    y = np.arange(-30.0, -24.0, 0.02)
    f = INST.f_nv(_line(y, 10.0))
    i0 = y.size // 2
    cw = rng.poisson(physics.cw_counts(f[i0], f, 20_000, 1e-3)).astype(float)
    fit = cw_slice_fwhm(y, cw)
    truth = 1.0 / (INST.tau_cw_s * abs(np.gradient(f, y)[i0]))
    assert abs(fit.fwhm_nm - truth) < max(3 * fit.fwhm_sigma_nm, 0.02 * truth)
    assert slice_report(fit)["value"] == pytest.approx(fit.fwhm_nm)


def test_quantity_is_json_safe():
    q = quantity(float("nan"), 1.0)
    assert q["value"] is None and q["sigma"] is None and q["why"]      # not determined
    json.dumps(q, allow_nan=False)
