"""Ground-truth data for the reconstruction tests and benchmarks (tests only).

Everything here uses the tip model and the exact NV Hamiltonian of
``nvmri_bluesky.physics``: the reconstruction under test never sees it.  The
datasets have the shape ``docs/reconstruction.md`` specifies (what the
catalog loader will hand the reconstruction).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import xarray as xr

from nvmri_bluesky import physics

INST = physics.Instrument()


def instrument(depth_nm: float) -> physics.Instrument:
    """The default instrument with the NV ``depth_nm`` below the surface."""
    return replace(INST, nv_depth_nm=float(depth_nm))


def _grid(x, y, z) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y, z = (np.atleast_1d(np.asarray(a, float)) for a in (x, y, z))
    gx, gy, gz = np.meshgrid(x, y, z, indexing="ij")
    return x, y, z, np.stack([gx, gy, gz], axis=-1)


def psf_map(inst: physics.Instrument, x, y, z, rng: np.random.Generator,
            lock_noise_hz: float = 30e3, noise_spread: float = 1.0) -> xr.Dataset:
    """Both locked NV transitions on a tip grid, with Gaussian lock noise.

    Every node's sigma is ``lock_noise_hz`` times a factor uniform in
    [1, ``noise_spread``] (drawn per node and transition; the lock is noisier
    off the line centre); the sigmas are stored as ``lock_frequency_sigma`` and
    ``lock_f_minus_sigma``, as a lock reports them.
    """
    x, y, z, tips = _grid(x, y, z)
    b = inst.field_at(inst.nv_position_nm, tips)
    fp, fm = physics.nv_transition_frequencies(b, inst.nv_axis)
    fp0, fm0 = physics.nv_transition_frequencies(inst.b0_vector, inst.nv_axis)
    def node_sigma() -> np.ndarray:          # no draw for one sigma: seeds keep their maps
        if noise_spread == 1.0:
            return np.full(fp.shape, float(lock_noise_hz))
        return lock_noise_hz * rng.uniform(1.0, noise_spread, fp.shape)

    sp, sm = node_sigma(), node_sigma()
    fp = fp + sp * rng.normal(0.0, 1.0, fp.shape)
    fm = fm + sm * rng.normal(0.0, 1.0, fm.shape)
    dims = ("x", "y", "z")
    return xr.Dataset(
        {"lock_frequency": (dims, fp), "lock_f_minus": (dims, fm),
         "lock_frequency_sigma": (dims, sp), "lock_f_minus_sigma": (dims, sm)},
        coords={"x": x, "y": y, "z": z},
        attrs={"f_nv0_hz": float(fp0) + rng.normal(0.0, lock_noise_hz / 5),
               "f_minus0_hz": float(fm0) + rng.normal(0.0, lock_noise_hz / 5)})


def _coherences(inst, offsets, tips, rf_hz, tau_s, t_pi_s, chunk=256):
    """(S, E) at every tip (..., 3) for dark spins at ``offsets`` (K, 3) from the NV."""
    offs = np.atleast_2d(np.asarray(offsets, float))
    lab = inst.nv_position_nm + offs
    nu = physics.dipolar_coupling(offs, inst.nv_axis)
    flat = tips.reshape(-1, 3)
    s_out = np.empty(len(flat))
    for i in range(0, len(flat), chunk):
        t = flat[i:i + chunk]
        b = inst.field_at(lab[None, :, :], t[:, None, :])              # (P, K, 3)
        f = physics.dark_spin_frequency(b)
        p = physics.dark_flip_probability(rf_hz - f, t_pi_s, inst.dark_t2_star_s)
        s_out[i:i + chunk] = physics.deer_coherence(tau_s, p, nu, inst.nv_t2_s,
                                                    inst.nv_t2_exponent)
    e = float(physics.echo_coherence(tau_s, inst.nv_t2_s, inst.nv_t2_exponent))
    return s_out.reshape(tips.shape[:-1]), e


def _counts(inst, s, e, shots, rng):
    def draw(p0):
        mean = physics.expected_counts(p0, shots, inst.photons_per_shot, inst.contrast)
        return rng.poisson(np.broadcast_to(mean, np.shape(s))).astype(float)
    return {"signal": draw(physics.p0_from_coherence(s)),
            "echo": draw(physics.p0_from_coherence(np.full(np.shape(s), e))),
            "bright": draw(np.ones(np.shape(s))), "dark": draw(np.zeros(np.shape(s)))}


def deer_raster(inst: physics.Instrument, offsets, x, y, z, rf_hz: float, tau_s: float,
                shots: int, rng: np.random.Generator, t_pi_s: float = 100e-9) -> xr.Dataset:
    """Per-point DEER counts on a tip grid for dark spins at ``offsets`` (spin - NV, nm)."""
    x, y, z, tips = _grid(x, y, z)
    s, e = _coherences(inst, offsets, tips, rf_hz, tau_s, t_pi_s)
    data = {k: (("x", "y", "z"), v) for k, v in _counts(inst, s, e, shots, rng).items()}
    return xr.Dataset(data, coords={"x": x, "y": y, "z": z},
                      attrs={"tau_s": tau_s, "rf_frequency_hz": rf_hz, "rf_duration_s": t_pi_s,
                             "shots": shots})


def deer_spectrum(inst: physics.Instrument, offsets, rf_hz, tau_s: float, shots: int,
                  rng: np.random.Generator, t_pi_s: float = 100e-9) -> xr.Dataset:
    """Tip-free DEER contrast counts vs RF frequency (tip far away)."""
    rf = np.asarray(rf_hz, float)
    offs = np.atleast_2d(np.asarray(offsets, float))
    f0 = inst.f_dark0
    p = physics.dark_flip_probability(rf[:, None] - f0, t_pi_s, inst.dark_t2_star_s)
    p = np.broadcast_to(p, (rf.size, len(offs)))
    nu = physics.dipolar_coupling(offs, inst.nv_axis)
    s = physics.deer_coherence(tau_s, p, nu, inst.nv_t2_s, inst.nv_t2_exponent)
    e = float(physics.echo_coherence(tau_s, inst.nv_t2_s, inst.nv_t2_exponent))
    data = {k: (("rf_frequency",), v) for k, v in _counts(inst, s, e, shots, rng).items()}
    return xr.Dataset(data, coords={"rf_frequency": rf},
                      attrs={"tau_s": tau_s, "rf_duration_s": t_pi_s, "shots": shots})


def deer_evolution(inst: physics.Instrument, offsets, taus_s, shots: int,
                   rng: np.random.Generator, t_pi_s: float = 100e-9) -> xr.Dataset:
    """Tip-free DEER counts vs free time with the RF on the dark-spin line."""
    taus = np.asarray(taus_s, float)
    offs = np.atleast_2d(np.asarray(offsets, float))
    p0 = float(physics.dark_flip_probability(0.0, t_pi_s, inst.dark_t2_star_s))
    nu = physics.dipolar_coupling(offs, inst.nv_axis)
    p = np.full((taus.size, len(offs)), p0)
    s = physics.deer_coherence(taus, p, nu, inst.nv_t2_s, inst.nv_t2_exponent)
    e = physics.echo_coherence(taus, inst.nv_t2_s, inst.nv_t2_exponent)
    counts = {}
    for k, p0g in (("signal", physics.p0_from_coherence(s)),
                   ("echo", physics.p0_from_coherence(e)),
                   ("bright", np.ones_like(s)), ("dark", np.zeros_like(s))):
        mean = physics.expected_counts(p0g, shots, inst.photons_per_shot, inst.contrast)
        counts[k] = (("tau",), rng.poisson(mean).astype(float))
    return xr.Dataset(counts, coords={"tau": taus},
                      attrs={"rf_frequency_hz": inst.f_dark0, "rf_duration_s": t_pi_s,
                             "shots": shots})


def layer_offsets(rng: np.random.Generator, height_nm: float, density_per_nm2: float,
                  radius_nm: float = 40.0, exclusion_nm: float = 0.0) -> np.ndarray:
    """Uniform random layer spins (Poisson count) at ``height_nm`` above the NV, (N, 3)."""
    n = rng.poisson(density_per_nm2 * np.pi * radius_nm**2)
    r = radius_nm * np.sqrt(rng.random(n))
    phi = 2 * np.pi * rng.random(n)
    offs = np.stack([r * np.cos(phi), r * np.sin(phi), np.full(n, float(height_nm))], -1)
    if exclusion_nm > 0:
        offs = offs[np.linalg.norm(offs, axis=-1) > exclusion_nm]
    return offs


def random_spin(rng: np.random.Generator, inst: physics.Instrument,
                min_coupling_hz: float = 50e3) -> np.ndarray:
    """A spin offset with |dx|, |dy| <= 8, -6 <= dz <= 2 nm, coupled by >= min_coupling_hz,
    and inside the diamond (at least 1 nm below the surface)."""
    while True:
        off = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-6, 2)])
        if inst.nv_position_nm[2] + off[2] > -1.0:
            continue
        if abs(physics.dipolar_coupling(off, inst.nv_axis)) >= min_coupling_hz:
            return off


def exact_dark_detuning(points_nm: np.ndarray, inst: physics.Instrument = INST) -> np.ndarray:
    """Exact Delta f_dark (Hz) of a tip at ``points_nm`` (..., 3), the NV's own dark line."""
    return physics.dark_spin_frequency(inst.field_at(inst.nv_position_nm, points_nm)) - inst.f_dark0


def map_spline_error_nm(grid: dict, lo: list[float], hi: list[float], seed: int,
                        n: int = 2000) -> np.ndarray:
    """Position error (nm) of a noise-free detuning map on ``grid`` at n random tips in [lo, hi]."""
    import xarray as xr

    from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant

    axes = [np.linspace(*grid[a]) for a in "xyz"]
    tips = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    coords = dict(zip("xyz", axes, strict=True))
    det = DetuningInterpolant.from_map(
        xr.DataArray(exact_dark_detuning(tips), dims=("x", "y", "z"), coords=coords))
    pts = np.random.default_rng(seed).uniform(lo, hi, (n, 3))
    value, grad = det.value_and_gradient(pts)
    return np.abs(value - exact_dark_detuning(pts)) / np.linalg.norm(grad, axis=-1)


def spin_psf_setup(depth_nm: float, rng: np.random.Generator):
    """The instrument with the NV ``depth_nm`` deep, the interpolant of its noisy
    protocol single-spin PSF map (``protocol.SPIN_PSF_MAP``) and the exact tip-free
    line, as the benchmarks start: ``(inst, detuning, line)``."""
    from nvmri_bluesky.reconstruct import protocol
    from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant, dark_detuning_map
    from nvmri_bluesky.reconstruct.lines import FlipLine

    inst = instrument(depth_nm)
    m = protocol.SPIN_PSF_MAP
    pm = psf_map(inst, np.linspace(*m["x"]), np.linspace(*m["y"]), np.linspace(*m["z"]), rng)
    det = DetuningInterpolant.from_map(dark_detuning_map(pm))
    return inst, det, FlipLine(centre_hz=inst.f_dark0, t2_star_s=inst.dark_t2_star_s)
