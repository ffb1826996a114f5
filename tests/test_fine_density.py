"""Fine-voxel deconvolution: the point operator, and the density around a known spin.

Truth: the exact physics (reconstruct_synth) on the protocol's survey, fine and
zoom rasters of a Fig. 4-like spin.
"""

from __future__ import annotations

import functools

import numpy as np
import reconstruct_synth as syn

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct import protocol
from nvmri_bluesky.reconstruct.deconvolve import PointOperator, richardson_lucy_operator
from nvmri_bluesky.reconstruct.density import fine_density
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant, dark_detuning_map
from nvmri_bluesky.reconstruct.lines import FlipLine

INST = syn.instrument(10.0)
SPIN = np.array([4.0, 5.1, -3.65])                      # spin - NV, nm
TAU_S = protocol.choose_tau(abs(float(physics.dipolar_coupling(SPIN, INST.nv_axis))))


def _shell(points: np.ndarray) -> np.ndarray:
    """A thin spherical shell of radius 3 nm around (0, 0, 5), NaN beyond 8 nm."""
    r = np.linalg.norm(np.asarray(points) - [0.0, 0.0, 5.0], axis=-1)
    return np.where(r < 8.0, np.exp(-(((r - 3.0) / 0.3) ** 2)), np.nan)


def _axes(step: float = 0.2) -> list[np.ndarray]:
    return [np.arange(-1.0, 1.0 + 1e-9, step), np.arange(-0.8, 1.2 + 1e-9, step),
            np.arange(-0.6, 0.6 + 1e-9, step)]


def test_point_operator_forward_and_adjoint_are_adjoint() -> None:
    rng = np.random.default_rng(3)
    tips = rng.uniform([-4, -4, 2], [4, 4, 8], (300, 3))
    op = PointOperator.build(_shell, tips, *_axes())
    assert op.object_shape == (11, 11, 7)
    x, y = rng.random(op.object_shape), rng.random(op.image_shape)  # positive: no cancellation
    lhs, rhs = float(op.forward(x) @ y), float(np.sum(x * op.adjoint(y)))
    assert lhs > 1.0
    assert abs(lhs - rhs) <= 1e-5 * lhs          # float32 round-off; a wrong index order: ~1 %
    # a voxel's column is the kernel at tip - voxel centre (NaN counted as 0)
    v = (3, 8, 2)
    col = op.adjoint(np.eye(op.image_shape[0])[5])[v]
    centre = np.array([_axes()[a][v[a]] for a in range(3)])
    assert np.isclose(col, np.nan_to_num(_shell(tips[op.rows[5]] - centre)), rtol=1e-6)


def test_point_operator_drops_tips_that_do_not_image_the_box() -> None:
    tips = np.array([[3.0, 0.0, 5.0], [0.0, 3.0, 5.0], [20.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    op = PointOperator.build(_shell, tips, *_axes())
    assert op.rows.tolist() == [0, 1]
    assert PointOperator.stack([op, op]).image_shape == (4,)


def test_point_operator_smooth_field_path_matches_direct_sampling() -> None:
    """K = kernel(field): the field from a coarse lattice + cubic splines, as if sampled."""
    def field(p):
        return np.linalg.norm(np.asarray(p) - [0.0, 0.0, 40.0], axis=-1)

    def kernel(f):
        return np.exp(-(((f - 36.0) / 0.2) ** 2))

    tips = np.random.default_rng(4).uniform([-5, -5, 3], [5, 5, 5], (200, 3))
    fast = PointOperator.build(kernel, tips, *_axes(), smooth=field, rel_cut=0.0)
    slow = PointOperator.build(lambda p: kernel(field(p)), tips, *_axes(), rel_cut=0.0)
    assert slow.matrix.max() > 0.5
    np.testing.assert_allclose(fast.matrix, slow.matrix, atol=2e-3)


def test_rl_on_a_point_operator_finds_a_point_object() -> None:
    rng = np.random.default_rng(5)
    tips = rng.uniform([-4, -4, 2], [4, 4, 8], (800, 3))
    op = PointOperator.build(_shell, tips, *_axes())
    truth = np.zeros(op.object_shape)
    truth[7, 3, 4] = 1.0
    res = richardson_lucy_operator(op.forward(truth), op, sigma=1e-3, max_iter=300)
    assert np.unravel_index(np.argmax(res.image), op.object_shape) == (7, 3, 4)


@functools.lru_cache(maxsize=1)
def _fig4_rasters() -> tuple[DetuningInterpolant, FlipLine, list]:
    rng = np.random.default_rng(11)
    m = protocol.SPIN_PSF_MAP
    pm = syn.psf_map(INST, *(np.linspace(*m[a]) for a in "xyz"), rng)
    det = DetuningInterpolant.from_map(dark_detuning_map(pm))
    line = FlipLine(centre_hz=INST.f_dark0, t2_star_s=INST.dark_t2_star_s, t_pi_s=100e-9)
    survey = protocol.design_spin_raster(det, line.centre_hz, TAU_S,
                                         step_nm=protocol.SPIN_SURVEY_STEP_NM)
    fine = protocol.design_fine_raster(det, survey, SPIN[None], line.fwhm_hz)
    zoom = protocol.design_zoom_raster(det, survey, line.centre_hz, SPIN, line.fwhm_hz)
    sets = [syn.deer_raster(INST, SPIN, *d.axes(), d.rf_frequency_hz, TAU_S, d.shots, rng)
            for d in (fine, survey, zoom)]
    return det, line, sets


def test_fine_density_peaks_at_the_spin_on_the_requested_voxels() -> None:
    det, line, sets = _fig4_rasters()
    centre = SPIN + [0.55, -0.45, 0.3]          # the truth off the box centre and off-voxel
    dens = fine_density(sets, det, line, centre, (1.6, 1.6, 1.0), step_nm=0.25)
    for a in ("dx", "dy", "dz"):
        np.testing.assert_allclose(np.diff(dens[a].values), 0.25, atol=1e-12)
    assert dens.attrs["step_nm"] == 0.25
    assert dens.attrs["n_points"] > 1000                  # every raster's points used
    peak = np.unravel_index(np.argmax(dens.values), dens.shape)
    found = np.array([dens[a].values[i] for a, i in zip(("dx", "dy", "dz"), peak, strict=True)])
    assert np.all(np.abs(found - SPIN) <= 0.3), found - SPIN
    # compact: most of the weight within 0.5 nm of the truth, little elsewhere
    grid = np.stack(np.meshgrid(*(dens[a].values for a in ("dx", "dy", "dz")),
                                indexing="ij"), -1)
    near = np.linalg.norm(grid - SPIN, axis=-1) <= 0.5
    assert dens.values[near].max() > 10 * np.median(dens.values[~near])
