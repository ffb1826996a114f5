"""Adaptive single-spin design: the next tip positions by information per instrument second.

Pure functions of *measured* quantities (the Delta f_dark map, the tip-free
flip line, a localisation fit): a plan calls them between batches
(:mod:`nvmri_bluesky.plans.adaptive`), a test or benchmark calls them on
synthetic posteriors.  No IOC, no tip model.

Model (the raster fit's, :mod:`.spinmodel`): a spin at offset r (from the NV)
with DEER weight w makes the contrast at tip t

    c(t) = w p(f_rf - f_dark0 - shift - Delta f_dark(t - r)),

p the measured flip line (:class:`~.lines.FlipLine`), and the signal gate's
mean count per shot is mu(c) = a (1 - C (1 - E (1 - c)) / 2)
(``_poisson.gate_means``).  Counts are Poisson, so one shot at t carries the
rank-one Fisher information u u^T about theta = (dx, dy, dz, w, shift_MHz),

    u = (d mu / d c) / sqrt(mu) * d c / d theta,

and N shots carry N u u^T (:func:`per_shot_scores`).  The reference gates fix
a, C and E at every point; the design treats them as known (they are shared
by all points and determined far better than the spin).

Posterior: Gaussian, mean (dx, dy, dz, w, shift) and covariance Sigma (the
localisation's covariance, :func:`posterior_from_fit`, marginalised to those
five parameters).  The score u depends on where the spin is, so the design
averages over ``n_samples`` draws of the posterior (Bayesian design: a wide
posterior spreads the chosen points over the flanks of every ring it
allows; a narrow one concentrates them on the flanks of the best fit's).

Criterion: the weighted trace phi(Sigma) = sum_i d_i Sigma_ii over dx, dy,
dz with d_i = 1 / target_i^2 (the sum of target-normalised variances; axes
already at their target count ``met_weight`` times less).  N shots at a
point with score u reduce it (Sherman-Morrison) by

    Delta phi = N u^T Sigma D Sigma u / (1 + N u^T Sigma u),

and cost N t_shot + t_overhead instrument seconds.  The batch is chosen
greedily (:func:`recommend`): the candidate of largest expected Delta phi per
second (averaged over the samples), its information added to every sample's
covariance, and again, so repeats are allowed and a batch spreads where
one point's information saturates.  The shots of a point maximise its rate
N / ((1 + N b)(t_overhead + N t_shot)), b = u^T Sigma u: N* = sqrt(t_overhead
/ (b t_shot)), clipped to [min_shots, max_shots] and rounded to
``shot_quantum`` (with no overhead, the fewest shots are the most efficient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct._poisson import gate_means
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant
from nvmri_bluesky.reconstruct.lines import FlipLine

__all__ = ["TARGET_SIGMA_NM", "concat_points", "SpinPosterior", "Recommendation", "per_shot_scores",
           "posterior_from_fit", "recommend", "candidate_tips", "predicted_sigma_nm",
           "target_reached"]

TARGET_SIGMA_NM = (0.3, 0.3, 0.05)
"""Default target one-sigma of (dx, dy, dz), nm: the paper's Fig. 4 (0.3 lateral, 0.05 vertical)."""

N_DESIGN = 5
"""Design parameters: dx, dy, dz (nm), w, line shift (MHz)."""


@dataclass(frozen=True)
class SpinPosterior:
    """Gaussian approximation of one spin's posterior, plus the nuisances the design needs.

    Attributes
    ----------
    mean : ndarray (5,)
        dx, dy, dz (nm, spin minus NV), DEER weight w, line shift (MHz).
    covariance : ndarray (5, 5)
        In the same order and units.
    photons_per_shot, contrast, echo : float
        a, optical contrast C and echo coherence E of the DEER points.
    """

    mean: NDArray
    covariance: NDArray
    photons_per_shot: float
    contrast: float
    echo: float

    @property
    def sigma(self) -> NDArray:
        """One-sigma of the five parameters."""
        return np.sqrt(np.clip(np.diag(self.covariance), 0.0, None))

    def samples(self, n: int, rng: np.random.Generator) -> NDArray:
        """``n`` draws (n, 5): the mean first, then Gaussian draws (w clipped to (0, 2]).

        Parameters
        ----------
        n : int
            Number of samples (>= 1).
        rng : numpy.random.Generator
        """
        out = np.tile(np.asarray(self.mean, float), (max(int(n), 1), 1))
        if n > 1:
            cov = 0.5 * (self.covariance + self.covariance.T)
            vals, vecs = np.linalg.eigh(cov)
            root = vecs * np.sqrt(np.clip(vals, 0.0, None))
            out[1:] += rng.standard_normal((n - 1, N_DESIGN)) @ root.T
        out[:, 3] = np.clip(out[:, 3], 1e-3, 2.0)
        return out


@dataclass(frozen=True)
class Recommendation:
    """The next batch: where, how many shots, and what it should give.

    Attributes
    ----------
    tips : ndarray (B, 3)
        Tip positions (x, y, z), nm, in the order chosen (repeats possible).
    shots : ndarray (B,) of int
        Shots per gate at each.
    index : ndarray (B,) of int
        Their rows in the candidate array.
    gain_per_s : ndarray (B,)
        Expected reduction of the criterion per instrument second when each was chosen, 1/s.
    predicted_sigma_nm : ndarray (3,)
        sigma of dx, dy, dz expected after the batch (sample average of the variances), nm.
    prior_sigma_nm : ndarray (3,)
        Before the batch, nm.
    instrument_s : float
        Shots x t_shot + overhead of the batch, s.
    """

    tips: NDArray
    shots: NDArray
    index: NDArray
    gain_per_s: NDArray
    predicted_sigma_nm: NDArray
    prior_sigma_nm: NDArray
    instrument_s: float
    details: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        """Plain lists and floats (a start document's or an event's content)."""
        return {"tips_nm": np.round(self.tips, 4).tolist(),
                "shots": [int(s) for s in self.shots],
                "gain_per_s": [float(g) for g in self.gain_per_s],
                "predicted_sigma_nm": [float(s) for s in self.predicted_sigma_nm],
                "prior_sigma_nm": [float(s) for s in self.prior_sigma_nm],
                "instrument_s": float(self.instrument_s)}


def per_shot_scores(tips: ArrayLike, params: ArrayLike, detuning: DetuningInterpolant,
                    line: FlipLine, rf_frequency_hz: float, photons_per_shot: float,
                    contrast: float, echo: float) -> NDArray:
    """Per-shot score vectors u (Fisher information u u^T) of single DEER points.

    Parameters
    ----------
    tips : array_like (M, 3)
        Tip positions, nm.
    params : array_like (5,) or (S, 5)
        Spin parameters dx, dy, dz (nm), w, line shift (MHz); several rows (posterior
        samples) give one score per sample and tip.
    detuning : DetuningInterpolant
        Measured Delta f_dark map.
    line : FlipLine
        Tip-free flip line (centre f_dark0, T2*, pi-pulse length).
    rf_frequency_hz : float
        RF carrier, Hz.
    photons_per_shot, contrast, echo : float
        a, C and E of the DEER points.

    Returns
    -------
    ndarray (S, M, 5) or (M, 5)
        u in units of sqrt(information per shot) per (nm, nm, nm, 1, MHz); 0 where
        t - r leaves the map.
    """
    t = np.asarray(tips, float).reshape(-1, 3)
    th = np.asarray(params, float)
    single = th.ndim == 1
    th = np.atleast_2d(th)
    pts = t[None, :, :] - th[:, None, :3]                          # (S, M, 3)
    f, g = detuning.value_and_gradient(pts)
    det = (rf_frequency_hz - line.centre_hz) - th[:, 4:5] * 1e6 - f
    p = np.nan_to_num(line.probability(det))
    dp = np.nan_to_num(line.derivative(det))
    g = np.nan_to_num(g)
    w = th[:, 3:4]
    c = w * p                                                      # (S, M)
    mu, _, _, _, dmu_dc = gate_means(np.ones(c.shape), photons_per_shot, contrast, echo, c)
    scale = dmu_dc / np.sqrt(np.maximum(mu[0], 1e-300))            # (S, M)
    dc = np.empty(c.shape + (N_DESIGN,))
    dc[..., :3] = (w * dp)[..., None] * g                          # d c / d r
    dc[..., 3] = p                                                 # d c / d w
    dc[..., 4] = -w * dp * 1e6                                     # d c / d shift (MHz)
    u = scale[..., None] * dc
    return u[0] if single else u


def posterior_from_fit(result: object, spin: int = 0) -> SpinPosterior:
    """The design posterior of one spin of a :class:`~.localize.LocalizationResult`.

    The spin's (dx, dy, dz, w) block of ``result.covariance`` is found from the
    end of the parameter vector (the spins are its last 4 K entries, in fit
    order; the block is the one whose sigmas are the spin's reported sigmas),
    the line shift is the entry after the first dataset-nuisance blocks
    (3 per dataset).  Their joint marginal is the sub-matrix.

    Parameters
    ----------
    result : LocalizationResult
        A localisation with at least one spin.
    spin : int
        Which of ``result.spins`` (strongest first).

    Returns
    -------
    SpinPosterior
        a, C, E from the last dataset's nuisance row.
    """
    spins = result.spins
    if not spins:
        raise NvmriError("the localisation found no spin to design for")
    fit = spins[spin]
    cov = np.asarray(result.covariance, float)
    k = len(spins)
    n = cov.shape[0]
    sig = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    starts = [n - 4 * (k - j) for j in range(k)]
    block = min(starts, key=lambda s: float(np.sum((sig[s:s + 3] - fit.offset_sigma_nm) ** 2)
                                            + (sig[s + 3] - fit.weight_sigma) ** 2))
    n_sets = np.asarray(result.nuisance).shape[0]
    idx = np.r_[np.arange(block, block + 4), 3 * n_sets]
    sub = cov[np.ix_(idx, idx)]
    mean = np.r_[fit.offset_nm, fit.weight, result.line_shift_hz / 1e6]
    a, c, e = np.asarray(result.nuisance, float)[-1]
    return SpinPosterior(mean=mean, covariance=sub, photons_per_shot=float(a),
                         contrast=float(c), echo=float(e))


def _weights(cov_diag: NDArray, target: NDArray, met_weight: float) -> NDArray:
    """d_i: 1 / target_i^2, divided by ``met_weight`` on axes at their target already."""
    d = 1.0 / target**2
    return np.where(cov_diag <= target**2, d / met_weight, d)


def predicted_sigma_nm(covariances: NDArray) -> NDArray:
    """sigma of dx, dy, dz from (S, 5, 5) sample covariances: sqrt of the mean variance, nm."""
    c = np.asarray(covariances, float).reshape(-1, N_DESIGN, N_DESIGN)
    return np.sqrt(np.clip(np.mean(np.diagonal(c, axis1=1, axis2=2)[:, :3], axis=0), 0, None))


def target_reached(sigma_nm: ArrayLike, target_sigma_nm: ArrayLike = TARGET_SIGMA_NM) -> bool:
    """Whether every axis' sigma is at or below its target."""
    return bool(np.all(np.asarray(sigma_nm, float) <= np.asarray(target_sigma_nm, float)))


def recommend(posterior: SpinPosterior, candidates: ArrayLike, detuning: DetuningInterpolant,
              line: FlipLine, rf_frequency_hz: float, shot_s: float, *, batch: int = 8,
              target_sigma_nm: ArrayLike = TARGET_SIGMA_NM, overhead_s: float = 0.0,
              min_shots: int = 50_000, max_shots: int = 400_000, shot_quantum: int = 10_000,
              n_samples: int = 24, met_weight: float = 20.0, min_gain: float = 1e-3,
              rng: np.random.Generator | int | None = 0) -> Recommendation:
    """The next batch of tip positions and shots by expected information per second.

    Parameters
    ----------
    posterior : SpinPosterior
        Current Gaussian posterior of the spin (:func:`posterior_from_fit`).
    candidates : array_like (M, 3)
        Tip positions allowed (inside the stage limits, above z_min), nm
        (:func:`candidate_tips`).
    detuning : DetuningInterpolant
        Measured Delta f_dark map.
    line : FlipLine
        Tip-free flip line.
    rf_frequency_hz : float
        RF carrier of the points, Hz.
    shot_s : float
        Instrument time of one shot of the DEER program (all its gates), s.
    batch : int
        Points to choose.
    target_sigma_nm : array_like (3,)
        Target sigma of dx, dy, dz, nm (the criterion's normalisation).
    overhead_s : float
        Fixed instrument time per point besides its shots (move, settle), s.
    min_shots, max_shots, shot_quantum : int
        Allowed shots per point and their rounding.
    n_samples : int
        Posterior draws the expected gain averages over (1: the mean only).
    met_weight : float
        Down-weighting of the axes already at their target.
    min_gain : float
        A point must reduce the criterion by at least this fraction of its current value
        (else the batch ends there: nothing left to learn from the candidates).
    rng : numpy.random.Generator or int or None
        Randomness of the posterior draws (an int: a seed).

    Returns
    -------
    Recommendation
    """
    cand = np.asarray(candidates, float).reshape(-1, 3)
    if cand.shape[0] == 0:
        raise NvmriError("no candidate tip positions to choose from")
    if not shot_s > 0:
        raise NvmriError(f"shot_s must be > 0 s (got {shot_s!r})")
    target = np.asarray(target_sigma_nm, float)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    samples = posterior.samples(n_samples, gen)
    u = per_shot_scores(cand, samples, detuning, line, rf_frequency_hz,
                        posterior.photons_per_shot, posterior.contrast, posterior.echo)
    s_n = samples.shape[0]
    cov = np.repeat(np.asarray(posterior.covariance, float)[None], s_n, axis=0)   # (S, 5, 5)
    prior_sigma = predicted_sigma_nm(cov)
    tips, shots, index, rates = [], [], [], []
    total_s = 0.0
    su = np.einsum("sij,smj->smi", cov, u)                         # Sigma u   (S, M, 5)
    b = np.einsum("smi,smi->sm", u, su)                            # u' Sigma u
    for _ in range(int(batch)):
        var = np.mean(np.diagonal(cov, axis1=1, axis2=2)[:, :3], axis=0)
        d = np.r_[_weights(var, target, met_weight), 0.0, 0.0]
        a = np.einsum("smi,i,smi->sm", su, d, su)                  # u' Sigma D Sigma u
        b_mean = np.maximum(np.mean(b, axis=0), 1e-300)
        n_opt = np.sqrt(overhead_s / (b_mean * shot_s)) if overhead_s > 0 else np.zeros_like(
            b_mean)
        n = np.clip(np.round(n_opt / shot_quantum) * shot_quantum, min_shots, max_shots)
        gain = np.mean(n * a / (1.0 + n * b), axis=0)              # (M,)
        rate = gain / (n * shot_s + overhead_s)
        m = int(np.argmax(rate))
        if not gain[m] > min_gain * float(np.sum(d[:3] * var)):
            break
        # the chosen point's information into every sample's covariance (Sherman-Morrison):
        # Sigma' = Sigma - k v v', v = Sigma u_m, so Sigma' u = Sigma u - k v (v' u)
        v = su[:, m, :].copy()                                     # (S, 5)
        k = n[m] / (1.0 + n[m] * b[:, m])                          # (S,)
        cov = cov - k[:, None, None] * np.einsum("si,sj->sij", v, v)
        vu = np.einsum("si,smi->sm", v, u)                         # (S, M)
        su = su - (k[:, None] * vu)[..., None] * v[:, None, :]
        b = b - k[:, None] * vu**2
        tips.append(cand[m])
        shots.append(int(n[m]))
        index.append(m)
        rates.append(float(rate[m]))
        total_s += float(n[m] * shot_s + overhead_s)
    if not tips:
        raise NvmriError("no candidate carries information about the spin "
                         "(candidates off every ring the posterior allows)")
    return Recommendation(tips=np.array(tips), shots=np.array(shots, int),
                          index=np.array(index, int), gain_per_s=np.array(rates),
                          predicted_sigma_nm=predicted_sigma_nm(cov),
                          prior_sigma_nm=prior_sigma, instrument_s=total_s,
                          details={"covariances": cov, "samples": samples})


def candidate_tips(detuning: DetuningInterpolant, line: FlipLine, rf_frequency_hz: float,
                   offsets_nm: ArrayLike, planes_nm: Sequence[float], step_nm: float = 0.5,
                   width_fwhm: float = 3.0, margin_nm: float = 1.0,
                   limits_nm: ArrayLike | None = None) -> NDArray:
    """Tip positions on a lattice near the resonant rings of the given offsets.

    Every lattice point (``step_nm``, on each plane of ``planes_nm``) within
    ``width_fwhm`` line widths of resonance for at least one of ``offsets_nm``
    (e.g. posterior draws), or within ``margin_nm`` of such a point, and with
    t - r inside the map for every offset.

    Parameters
    ----------
    detuning : DetuningInterpolant
    line : FlipLine
    rf_frequency_hz : float
        RF carrier, Hz.
    offsets_nm : array_like (K, 3)
        Spin offsets whose rings to cover, nm.
    planes_nm : sequence of float
        Apex heights, nm.
    step_nm, width_fwhm, margin_nm : float
    limits_nm : array_like (3, 2), optional
        Stage limits [[x_lo, x_hi], [y_lo, y_hi], [z_lo, z_hi]] to stay inside, nm.

    Returns
    -------
    ndarray (M, 3)
        nm.
    """
    offs = np.atleast_2d(np.asarray(offsets_nm, float))
    b = detuning.bounds
    lo = offs[:, :2].max(axis=0) + b[:2, 0]
    hi = offs[:, :2].min(axis=0) + b[:2, 1]
    if limits_nm is not None:
        lim = np.asarray(limits_nm, float)
        lo, hi = np.maximum(lo, lim[:2, 0]), np.minimum(hi, lim[:2, 1])
    xs = np.arange(np.ceil(lo[0] / step_nm) * step_nm, hi[0] + 1e-9, step_nm)
    ys = np.arange(np.ceil(lo[1] / step_nm) * step_nm, hi[1] + 1e-9, step_nm)
    off_hz = rf_frequency_hz - line.centre_hz
    out = []
    grow = int(np.ceil(margin_nm / step_nm))
    for z in planes_nm:
        if limits_nm is not None and not lim[2, 0] <= z <= lim[2, 1]:
            continue
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        tips = np.stack([gx, gy, np.full_like(gx, float(z))], -1)
        near = np.zeros(gx.shape, bool)
        inside = np.ones(gx.shape, bool)
        for r in offs:
            f = detuning(tips - r)
            inside &= np.isfinite(f)
            near |= np.abs(np.nan_to_num(f, nan=np.inf) - off_hz) <= width_fwhm * line.fwhm_hz
        if grow:
            from scipy import ndimage

            near = ndimage.binary_dilation(near, iterations=grow)
        out.append(tips[near & inside])
    return np.concatenate(out) if out else np.zeros((0, 3))


def concat_points(datasets: Sequence[xr.Dataset]) -> xr.Dataset:
    """Lists of DEER points (``deer_points`` runs) as one list: one dataset for the fit.

    Parameters
    ----------
    datasets : sequence of xarray.Dataset
        Along dimension ``point`` with ``x``, ``y``, ``z`` coordinates and a ``shots``
        variable; they must share ``tau_s`` and ``rf_frequency_hz``.

    Returns
    -------
    xarray.Dataset
        Their points in order (attrs of the first; ``uids`` lists every run's uid).
    """
    sets = list(datasets)
    if not sets:
        raise NvmriError("no DEER points to combine")
    for key in ("tau_s", "rf_frequency_hz"):
        values = {float(d.attrs[key]) for d in sets}
        if len(values) > 1:
            raise NvmriError(f"DEER point runs with different {key}: {sorted(values)}")
    keep = [v for v in sets[0].data_vars if all(v in d.data_vars for d in sets)]
    out = xr.concat([d[keep] for d in sets], dim="point", combine_attrs="override")
    out = out.assign_coords(point=np.arange(out.sizes["point"]))
    out.attrs["uids"] = [str(d.attrs.get("uid", "")) for d in sets]
    return out
