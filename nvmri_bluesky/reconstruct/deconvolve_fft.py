"""Generic n-D FFT Richardson-Lucy of an image by a centred PSF array.

In the convention of ``scipy.signal.convolve(..., mode="same")`` /
``skimage.restoration``: the image is modelled as the *linear* (zero-padded,
not circular) convolution of the object with the PSF, cropped to the image.
:func:`richardson_lucy` reproduces
``skimage.restoration.richardson_lucy(image, psf, num_iter, clip=False)``
exactly (same update, same ``eps``) but pads only as much as the 'same' crop
needs, precomputes both OTFs once and runs multithreaded ``scipy.fft``.
Iterations by the discrepancy principle (module doc of :mod:`.deconvolve`):
:func:`richardson_lucy_discrepancy`.

The pipeline deconvolves with its imaging operators
(:func:`~.deconvolve.richardson_lucy_operator`); this is the alternative the
``deconvolve`` benchmark (``benchmarks/bench_deconvolve.py``) times them against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.reconstruct.deconvolve import (
    _EPS,
    _WORKERS,
    RichardsonLucyResult,
    estimate_noise,
)

__all__ = ["richardson_lucy", "richardson_lucy_discrepancy", "same_pad_shape"]


def _float_type(dtype: np.dtype) -> type:
    """skimage's ``_supported_float_type``: float32 stays, everything else float64."""
    if np.dtype(dtype) in (np.dtype(np.float16), np.dtype(np.float32)):
        return np.float32
    return np.float64


def same_pad_shape(image_shape: Sequence[int], psf_shape: Sequence[int]) -> tuple[int, ...]:
    """Smallest fast FFT shape with which a circular convolution equals the 'same' crop.

    The 'same' output is the window ``[c, c + n)`` of the full linear
    convolution (length ``n + m - 1``), ``c = (m - 1) // 2``.  A circular
    convolution of length ``L`` aliases full indices ``q >= L`` onto ``q - L``;
    the window is clean when ``L >= n + m - 1 - c``.  That is ``n + m/2`` instead
    of the ``n + m - 1`` that ``fftconvolve`` uses: 96 instead of 128 per axis
    for a 64-point image and 64-point PSF.
    """
    out = []
    for n, m in zip(image_shape, psf_shape, strict=True):
        if m > n:
            raise ValueError(f"PSF larger than the image along an axis ({m} > {n})")
        c = (m - 1) // 2
        out.append(sfft.next_fast_len(n + m - 1 - c, real=True))
    return tuple(out)


class _SameConvolver:
    """'same'-mode convolution by a fixed PSF and by its mirror, OTFs precomputed."""

    def __init__(self, image_shape: Sequence[int], psf: NDArray) -> None:
        self.image_shape = tuple(image_shape)
        self.psf_shape = psf.shape
        self.shape = same_pad_shape(image_shape, psf.shape)
        self.axes = tuple(range(psf.ndim))
        self.otf = sfft.rfftn(psf, s=self.shape, axes=self.axes, workers=_WORKERS)
        self.otf_mirror = sfft.rfftn(np.flip(psf), s=self.shape, axes=self.axes,
                                     workers=_WORKERS)
        self.crop = tuple(slice((m - 1) // 2, (m - 1) // 2 + n)
                          for n, m in zip(self.image_shape, psf.shape, strict=True))
        self.inner = tuple(slice(0, n) for n in self.image_shape)
        self.buf = np.zeros(self.shape, dtype=psf.dtype)

    def _apply(self, x: NDArray, otf: NDArray) -> NDArray:
        # copying into a persistent zero-padded buffer is much faster than rfftn(s=...)
        self.buf[self.inner] = x
        f = sfft.rfftn(self.buf, axes=self.axes, workers=_WORKERS)
        f *= otf
        return sfft.irfftn(f, s=self.shape, axes=self.axes, workers=_WORKERS,
                           overwrite_x=True)[self.crop]

    def conv(self, x: NDArray) -> NDArray:
        return self._apply(x, self.otf)

    def conv_mirror(self, x: NDArray) -> NDArray:
        return self._apply(x, self.otf_mirror)


def richardson_lucy_discrepancy(image: ArrayLike, psf: ArrayLike,
                                sigma: float | ArrayLike | None = None,
                                max_iter: int = 500, *, clip: bool = False,
                                filter_epsilon: float | None = None) -> RichardsonLucyResult:
    """Richardson-Lucy with the iteration count chosen by the discrepancy principle.

    Parameters
    ----------
    image, psf : array_like
        As for :func:`richardson_lucy`.
    sigma : float or array_like, optional
        Noise standard deviation (scalar or the image's shape); default
        :func:`estimate_noise`.
    max_iter : int
        Upper bound on iterations.

    Returns
    -------
    RichardsonLucyResult
        Stops at the first iteration whose *input* estimate reblurs to
        ``mean(((y - h * x) / sigma)^2) <= 1`` (that estimate is returned).
    """
    return _rl(image, psf, max_iter, clip, filter_epsilon,
               sigma if sigma is not None else estimate_noise(image), stop=True)


def richardson_lucy(image: ArrayLike, psf: ArrayLike, num_iter: int | None = 50, *,
                    clip: bool = False, filter_epsilon: float | None = None,
                    sigma: float | ArrayLike | None = None) -> NDArray:
    """Richardson-Lucy deconvolution, n-D, FFT with precomputed OTFs.

    Same algorithm as ``skimage.restoration.richardson_lucy``: start at 0.5,
    ``x <- x * (y / (h * x + 1e-12)) * h_mirror``, 'same'-mode linear
    convolutions, float32 kept as float32.

    Parameters
    ----------
    image : array_like, shape (n1, ..., nd)
        Blurred map, non-negative for the usual RL meaning.
    psf : array_like, shape (m1, ..., md), each mi <= ni
        Centred PSF (index ``(mi - 1) // 2`` is zero offset), normalised to
        sum 1 as skimage assumes (RL's multiplicative update has no other
        normalisation).
    num_iter : int or None
        Iterations; ``None`` chooses them by the discrepancy principle
        (:func:`richardson_lucy_discrepancy`, ``max_iter`` 500).
    clip : bool
        Clip the result to [-1, 1] as skimage does by default (default False
        here: physical maps are not in [-1, 1]).
    filter_epsilon : float, optional
        As in skimage: ``y / conv`` set to 0 where ``conv < filter_epsilon``.
    sigma : float or array_like, optional
        Noise level for ``num_iter=None``; default :func:`estimate_noise`.

    Returns
    -------
    ndarray
        The deconvolved map.
    """
    if num_iter is None:
        return richardson_lucy_discrepancy(image, psf, sigma, clip=clip,
                                           filter_epsilon=filter_epsilon).image
    return _rl(image, psf, int(num_iter), clip, filter_epsilon, None, stop=False).image


def _rl(image: ArrayLike, psf: ArrayLike, num_iter: int, clip: bool,
        filter_epsilon: float | None, sigma: float | ArrayLike | None,
        stop: bool) -> RichardsonLucyResult:
    y0 = np.asarray(image)
    ft = _float_type(y0.dtype)
    y = y0.astype(ft, copy=False)
    h = np.asarray(psf).astype(ft, copy=False)
    if y.ndim != h.ndim:
        raise ValueError("image and psf need the same number of dimensions")
    conv_op = _SameConvolver(y.shape, h)
    x = np.full(y.shape, 0.5, dtype=ft)
    inv_s2 = None if sigma is None else 1.0 / np.square(np.asarray(sigma, float))
    chi2 = float("nan")
    done = 0
    converged = False
    for _ in range(num_iter):
        conv = conv_op.conv(x)
        if inv_s2 is not None:
            chi2 = float(np.mean((y - conv) ** 2 * inv_s2))
            if stop and chi2 <= 1.0:
                converged = True
                break
        conv += _EPS
        if filter_epsilon:
            rel = np.where(conv < filter_epsilon, 0, y / conv)
        else:
            rel = np.divide(y, conv, out=conv)
        x *= conv_op.conv_mirror(rel).astype(ft, copy=False)
        done += 1
    else:
        if inv_s2 is not None:
            chi2 = float(np.mean((y - conv_op.conv(x)) ** 2 * inv_s2))
            converged = chi2 <= 1.0
    if clip:
        x = np.clip(x, -1, 1)
    return RichardsonLucyResult(image=x, num_iter=done, chi2=chi2, converged=converged)
