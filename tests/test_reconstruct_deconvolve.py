"""Deconvolution: RL identical to scikit-image, noise rules, the MRI operator."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import convolve

from nvmri_bluesky.reconstruct.deconvolve import (
    ShiftOperator,
    estimate_noise,
    richardson_lucy_operator,
)
from nvmri_bluesky.reconstruct.deconvolve_fft import (
    richardson_lucy,
    richardson_lucy_discrepancy,
    same_pad_shape,
)

skimage_restoration = pytest.importorskip("skimage.restoration")


@pytest.mark.parametrize("img_shape,psf_shape", [((40, 37), (6, 5)), ((24, 20, 18), (7, 8, 5)),
                                                 ((16, 16, 16), (16, 16, 16))])
def test_rl_matches_skimage(img_shape, psf_shape):
    rng = np.random.default_rng(0)
    img = rng.poisson(5.0, img_shape).astype(float)
    psf = rng.random(psf_shape)
    psf /= psf.sum()
    ref = skimage_restoration.richardson_lucy(img, psf, num_iter=8, clip=False)
    ours = richardson_lucy(img, psf, num_iter=8)
    assert ours.dtype == ref.dtype
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_rl_float32_and_clip():
    rng = np.random.default_rng(1)
    img = rng.random((20, 22)).astype(np.float32)
    psf = np.ones((3, 3), np.float32) / 9
    ours = richardson_lucy(img, psf, num_iter=5, clip=True)
    ref = skimage_restoration.richardson_lucy(img, psf, num_iter=5, clip=True)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_same_pad_shape_is_minimal_and_exact():
    assert same_pad_shape((64,), (64,)) == (96,)
    with pytest.raises(ValueError):
        same_pad_shape((4,), (5,))


def _blurred_points(rng, sigma):
    x = np.zeros((48, 48))
    x[12, 30], x[35, 14] = 3.0, 2.0
    g = np.arange(15) - 7
    psf = np.exp(-(g[:, None] ** 2 + g[None] ** 2) / 6.0)
    psf /= psf.sum()
    return x, psf, convolve(x, psf, mode="same") + sigma * rng.standard_normal(x.shape)


def test_estimate_noise():
    rng = np.random.default_rng(2)
    _, _, y = _blurred_points(rng, 0.05)
    assert estimate_noise(y) == pytest.approx(0.05, rel=0.15)


def test_discrepancy_rl_finds_points():
    rng = np.random.default_rng(3)
    x, psf, y = _blurred_points(rng, 0.01)
    res = richardson_lucy_discrepancy(np.clip(y, 0, None), psf, sigma=0.01)
    assert res.converged and res.chi2 <= 1.0 and 0 < res.num_iter < 500
    assert np.unravel_index(np.argmax(res.image), y.shape) == (12, 30)
    # fewer iterations than the stopping rule chose leave a worse fit
    early = richardson_lucy(np.clip(y, 0, None), psf, num_iter=max(res.num_iter // 4, 1))
    chi_early = np.mean((y - convolve(early, psf, mode="same")) ** 2) / 0.01**2
    assert chi_early > res.chi2


def _ring_kernel(points):
    p = np.asarray(points, float)
    r = np.hypot(p[..., 0] - 2.0, p[..., 1])
    return np.exp(-((r - 5.0 + 0.3 * (p[..., 2] - 10.0)) ** 2) / 0.8)


def test_shift_operator_adjoint_and_forward():
    x = np.arange(-10, 12.1, 1.5)
    y = np.arange(-9, 9.1, 1.5)
    z_obj = np.array([-2.0, 0.0, 1.0])
    op = ShiftOperator.build(_ring_kernel, x, y, [10.0, 12.0], 4, 3, z_obj, supersample=1)
    rng = np.random.default_rng(4)
    a = rng.random(op.object_shape)
    b = rng.random(op.image_shape)
    assert np.sum(op.forward(a) * b) == pytest.approx(np.sum(a * op.adjoint(b)), rel=1e-10)
    # a unit spin at offset (1.5, -3, 1) images as kernel(t - offset)
    obj = np.zeros(op.object_shape)
    obj[4 + 1, 3 - 2, 2] = 1.0
    gx, gy, gz = np.meshgrid(x, y, [10.0, 12.0], indexing="ij")
    expect = _ring_kernel(np.stack([gx - 1.5, gy + 3.0, gz - 1.0], -1))
    np.testing.assert_allclose(op.forward(obj), expect, atol=1e-12)
    res = richardson_lucy_operator(expect, op, sigma=1e-3, max_iter=300)
    assert np.unravel_index(np.argmax(res.image), op.object_shape) == (5, 1, 2)
