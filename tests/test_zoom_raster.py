"""The single-spin zoom raster (reconstruct/protocol.design_zoom_raster) on a synthetic map.

The design sees only the (noisy, synthetic) two-transition map; the test
grades it with the exact physics: the spin's slice crosses the patch, and the
slice there is as thin as the paper's resolution.
"""

from __future__ import annotations

import numpy as np
import pytest
import reconstruct_synth as syn

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct import protocol
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant, dark_detuning_map

INST = physics.Instrument()
SPIN = np.array([4.0, 5.1, -3.65])                      # Fig. 4 offset from the NV, nm
FWHM_HZ = 11.95e6                                       # flip line of t_pi 100 ns, T2* 150 ns




@pytest.fixture(scope="module")
def detuning() -> DetuningInterpolant:
    m = protocol.SPIN_PSF_MAP
    pm = syn.psf_map(INST, np.linspace(*m["x"]), np.linspace(*m["y"]), np.linspace(*m["z"]),
                     np.random.default_rng(3))
    return DetuningInterpolant.from_map(dark_detuning_map(pm))


def test_map_spline_is_accurate_where_the_zoom_raster_looks():
    """Noise-free map on the protocol's grid: spline error in position units, z 17-30 nm."""
    err_nm = syn.map_spline_error_nm(protocol.SPIN_PSF_MAP, [-25, -40, 17], [60, 40, 30], 4)
    assert np.sqrt(np.mean(err_nm**2)) < 0.02 and np.percentile(err_nm, 99) < 0.1


def test_zoom_raster_crosses_a_thin_slice_of_the_spin(detuning):
    survey = protocol.RasterDesign(x=(-30.0, 50.0, 21), y=(-30.0, 40.0, 18), z=(30.0,),
                                   rf_frequency_hz=INST.f_dark0 + 300e6, rf_offset_hz=300e6,
                                   tau_s=7.8e-6, shots=200_000)
    zoom = protocol.design_zoom_raster(detuning, survey, INST.f_dark0, SPIN + [0.1, -0.1, 0.05],
                                       FWHM_HZ)
    assert zoom is not None
    z = zoom.z[0]
    assert detuning.bounds[2, 0] + 2.0 <= z < survey.z[0]          # fit stays inside the map
    assert zoom.n_points == protocol.SPIN_ZOOM_POINTS**2
    assert zoom.tau_s == survey.tau_s and zoom.shots == survey.shots
    # the truth: the spin's flip probability over the patch and the slice widths there
    xs, ys, _ = zoom.axes()
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    tips = np.stack([gx, gy, np.full_like(gx, z)], -1)
    rel = tips - SPIN
    p = physics.dark_flip_probability(zoom.rf_offset_hz - syn.exact_dark_detuning(rel))
    on = p >= 0.5 * physics.dark_flip_probability(0.0)
    assert on.sum() >= 10                                           # the slice crosses it
    h, dark = 1e-3, syn.exact_dark_detuning
    grad = np.stack([(dark(rel + h * e) - dark(rel - h * e)) / (2 * h)
                     for e in np.eye(3)], -1)
    lateral = FWHM_HZ / np.hypot(grad[..., 0], grad[..., 1])
    vertical = FWHM_HZ / np.abs(grad[..., 2])
    assert np.average(lateral[on], weights=p[on]) <= 0.8
    assert np.average(vertical[on], weights=p[on]) <= 1.5
