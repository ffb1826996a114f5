"""deconvolve: the pipeline's Richardson-Lucy with the raster's imaging operator vs FFT RL.

What the pipeline runs (``localize_spins`` -> ``density.deconvolve_deer``): the
spin survey raster's DEER contrast, its sigma propagated from the counts,
deconvolved onto the offset grid of the prior box (the raster's lateral step,
0.5 nm planes) by :func:`nvmri_bluesky.reconstruct.deconvolve.richardson_lucy_operator`
with the operator the pipeline builds (``density.shift_operator``: per object
plane a 2-D FFT convolution with a PSF slice), discrepancy stop, at most 60
iterations.  The raster is the demo's survey (``protocol.design_spin_raster``
with ``SPIN_SURVEY_STEP_NM``) of the paper's Fig. 4 spin (dx, dy, dz = 4.0, 5.1,
-3.65 nm, NV 10 nm deep) over the protocol's PSF map, synthetic Poisson counts
(tests/reconstruct_synth.py, as the localize benchmark; the demo's own raster
needs the simulated IOC).

baseline, the best FFT alternative: the n-D FFT Richardson-Lucy
(:func:`nvmri_bluesky.reconstruct.deconvolve_fft.richardson_lucy`, scikit-image's
algorithm with minimal 'same' padding and precomputed OTFs) of the same contrast
(clipped at 0 as the operator RL does) and sigma, discrepancy stop
(:func:`~nvmri_bluesky.reconstruct.deconvolve_fft.richardson_lucy_discrepancy`), by one PSF
slice: the PSF at the spin's true depth (its best case: a 2-D object, one plane),
sampled like the operator's kernels (2 x 2 sub-points per lateral voxel) on the
largest odd grid that fits the raster, normalised to sum 1.
ours / baseline = best-of-20 wall times, run alternately so both see the same
load; the operator is built once per ``localize_spins`` (and reused for every
residual), so its build is timed apart.  The detail also times both at the same
fixed number of iterations (ours' discrepancy count) and gives each one's
strongest lateral peak against the spin.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SPIN = np.array([4.0, 5.1, -3.65])
DEPTH = 10.0
DZ_STEP = 0.5
MAX_ITER = 60           # density.deconvolve_deer's default
SUPERSAMPLE = 2         # density.shift_operator's default


def _interleaved(fn_a, fn_b, repeats: int = 20) -> tuple[float, Any, float, Any]:
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


def _raster() -> tuple[Any, Any]:
    """The survey raster and its PSF (module doc)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import reconstruct_synth as syn

    from nvmri_bluesky import physics
    from nvmri_bluesky.reconstruct import protocol
    from nvmri_bluesky.reconstruct.psf import DarkSpinPSF

    rng = np.random.default_rng(2024)
    inst, det, line = syn.spin_psf_setup(DEPTH, rng)
    tau = protocol.choose_tau(abs(float(physics.dipolar_coupling(SPIN, inst.nv_axis))))
    design = protocol.design_spin_raster(det, line.centre_hz, tau,
                                         step_nm=protocol.SPIN_SURVEY_STEP_NM)
    ds = syn.deer_raster(inst, SPIN, *design.axes(), design.rf_frequency_hz, tau,
                         design.shots, rng)
    return ds.transpose("x", "y", "z", ...), DarkSpinPSF(det, line, design.rf_frequency_hz)


def _fft_psf(psf: Any, x: np.ndarray, y: np.ndarray, z: float, dz: float) -> np.ndarray:
    """PSF(u, z - dz) on the raster's lattice, centred, odd sizes <= the raster's."""
    hx, hy = x[1] - x[0], y[1] - y[0]
    nx, ny = x.size - (1 - x.size % 2), y.size - (1 - y.size % 2)
    ux = (np.arange(nx) - (nx - 1) // 2) * hx
    uy = (np.arange(ny) - (ny - 1) // 2) * hy
    gx, gy = np.meshgrid(ux, uy, indexing="ij")
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    acc = np.zeros_like(gx)
    for sx in sub:
        for sy in sub:
            pts = np.stack([gx - sx * hx, gy - sy * hy, np.full_like(gx, z - dz)], -1)
            acc += np.nan_to_num(np.asarray(psf(pts), float))
    return acc / acc.sum()


def _peak(values: np.ndarray, axes: list[np.ndarray]) -> list[float]:
    idx = np.unravel_index(int(np.argmax(values)), values.shape)
    return [float(a[i]) for a, i in zip(axes, idx, strict=False)]


def run() -> dict[str, Any]:
    """Time both; return ``{name, ours, baseline, ratio, unit, detail}`` (s)."""
    from nvmri_bluesky.reconstruct.counts import deer_contrast_dataset
    from nvmri_bluesky.reconstruct.deconvolve import richardson_lucy_operator
    from nvmri_bluesky.reconstruct.deconvolve_fft import (
        richardson_lucy,
        richardson_lucy_discrepancy,
    )
    from nvmri_bluesky.reconstruct.density import _object_grid, shift_operator
    from nvmri_bluesky.reconstruct.spinmodel import PRIOR_BOX

    ds, psf = _raster()
    con = deer_contrast_dataset(ds)
    c = con["contrast"].transpose("x", "y", "z").values
    s = con["contrast_sigma"].transpose("x", "y", "z").values
    bad = ~np.isfinite(c) | ~np.isfinite(s)
    c, s = np.where(bad, 0.0, c), np.where(bad, np.inf, s)       # as deconvolve_deer
    t0 = time.perf_counter()
    op = shift_operator(ds, psf, PRIOR_BOX, DZ_STEP)
    t_build = time.perf_counter() - t0
    x, y = ds["x"].values, ds["y"].values
    z_img = float(np.atleast_1d(ds["z"].values)[0])
    h = _fft_psf(psf, x, y, z_img, SPIN[2])
    img, sig = np.clip(c[:, :, 0], 0.0, None), s[:, :, 0]
    t_ours, ours, t_base, base = _interleaved(
        lambda: richardson_lucy_operator(c, op, sigma=s, max_iter=MAX_ITER),
        lambda: richardson_lucy_discrepancy(img, h, sig))
    n_fixed = max(ours.num_iter, 1)
    t_ours_n, _, t_base_n, _ = _interleaved(
        lambda: richardson_lucy_operator(c, op, sigma=1e-12, max_iter=n_fixed),
        lambda: richardson_lucy(img, h, n_fixed))
    kx, ky, z_obj, hx, hy = _object_grid(ds, PRIOR_BOX, DZ_STEP)
    obj_axes = [np.arange(-kx, kx + 1) * hx, np.arange(-ky, ky + 1) * hy, z_obj]
    detail = {
        "raster_shape": list(c.shape), "object_shape": list(op.object_shape),
        "fft_psf_shape": list(h.shape), "operator_build_s": round(t_build, 4),
        "ours_iterations": ours.num_iter, "ours_converged": bool(ours.converged),
        "baseline_iterations": base.num_iter, "baseline_converged": bool(base.converged),
        "fixed_iterations": {"iterations": n_fixed, "ours_s": round(t_ours_n, 4),
                             "baseline_s": round(t_base_n, 4),
                             "ratio": round(t_ours_n / t_base_n, 3)},
        "spin_nm": SPIN.tolist(),
        "ours_peak_nm": _peak(ours.image, obj_axes),
        "baseline_peak_nm": _peak(base.image, [x, y]),
    }
    return {"name": "deconvolve", "ours": round(t_ours, 4), "baseline": round(t_base, 4),
            "ratio": round(t_ours / t_base, 3), "unit": "s", "detail": detail}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
