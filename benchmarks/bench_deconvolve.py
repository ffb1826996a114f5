"""deconvolve: our Richardson-Lucy vs ``skimage.restoration.richardson_lucy`` on a 64^3 map.

Both run the same number of iterations with the same PSF (``clip=False``)
on the same image; the results must agree (max abs difference in the
detail).  The map is a 64^3 DEER-like volume: a handful of point spins
imaged through a resonant-shell PSF of the same size (a thin spherical cap,
what the tip's resonant slice looks like on the tip grid), plus noise.
ours = best-of-5 wall time of :func:`nvmri_bluesky.reconstruct.richardson_lucy`,
baseline = best-of-5 of scikit-image, run alternately so both see the same
load.  ratio = ours / baseline (target <= 0.5).
The detail also times a small (9^3) PSF, where the padding saving is small.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

N = 64
ITERATIONS = 10


def _shell_psf(size: int) -> np.ndarray:
    g = np.arange(size) - (size - 1) / 2
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x**2 + y**2 + (z + size / 3) ** 2)
    psf = np.exp(-(((r - size / 2) / 1.2) ** 2)) * (z > -size / 6)
    return psf / psf.sum()


def _image(psf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import fftconvolve

    obj = np.zeros((N, N, N))
    for _ in range(6):
        obj[tuple(rng.integers(16, 48, 3))] = rng.uniform(0.5, 2.0)
    img = fftconvolve(obj, psf, mode="same")
    return np.clip(img + 0.02 * img.max() * rng.standard_normal(img.shape), 0, None)


def _interleaved(fn_a, fn_b, repeats: int = 5) -> tuple[float, Any, float, Any]:
    """Best-of-``repeats`` times of two functions, run alternately (same machine load)."""
    ta = tb = np.inf
    out_a = out_b = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out_a = fn_a()
        ta = min(ta, time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_b = fn_b()
        tb = min(tb, time.perf_counter() - t0)
    return ta, out_a, tb, out_b


def run() -> dict[str, Any]:
    """Time both; return ``{name, ours, baseline, ratio, unit, detail}`` (s)."""
    from skimage.restoration import richardson_lucy as sk_rl

    from nvmri_bluesky.reconstruct import richardson_lucy

    rng = np.random.default_rng(0)
    detail: dict[str, Any] = {"shape": [N, N, N], "iterations": ITERATIONS}
    results = {}
    for label, size in (("shell64", N), ("small9", 9)):
        psf = _shell_psf(size)
        img = _image(psf, rng)
        t_ours, ours, t_base, base = _interleaved(
            lambda i=img, p=psf: richardson_lucy(i, p, ITERATIONS),
            lambda i=img, p=psf: sk_rl(i, p, num_iter=ITERATIONS, clip=False))
        diff = float(np.max(np.abs(ours - base)))
        results[label] = (t_ours, t_base)
        detail[label] = {"psf_shape": [size] * 3, "ours_s": round(t_ours, 4),
                         "baseline_s": round(t_base, 4), "ratio": round(t_ours / t_base, 3),
                         "max_abs_diff": diff,
                         "max_rel_diff": diff / float(np.max(np.abs(base)))}
    t_ours, t_base = results["shell64"]
    return {"name": "deconvolve", "ours": round(t_ours, 4), "baseline": round(t_base, 4),
            "ratio": round(t_ours / t_base, 3), "unit": "s", "detail": detail}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
