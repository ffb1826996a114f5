"""What a sample holds, decided from its tip-free DEER evolution by the Poisson likelihood.

The tip-free DEER evolution (RF on the dark-spin line, tip retracted) is
explained by nested models of its contrast (``physics.deer_coherence`` and
the layer's expected decay, :mod:`.layers`):

    c(tau) = b + 1 - prod_j [1 - A_j (1 - cos(pi nu_j tau))] exp(-q J(tau; h)),

flat (no spin: only b), point spins (amplitude A_j = flip probability,
coupling nu_j) and a layer (q = n p0, its density times the flip
probability; the height h is profiled on :data:`LAYER_HEIGHTS_NM`).  The
four gates' counts are fitted by Poisson maximum likelihood with one echo
coherence per tau (:func:`~._poisson.fit_sweep`).  Components are added one
at a time (forward selection): the candidate (a spin started at the
periodogram peak of the remaining contrast, or the layer) that lowers the
deviance most is kept when it lowers it by at least
:data:`DELTA_DEVIANCE_MIN`, a likelihood-ratio statistic 2 Delta log L.

Two comparable couplings (117 and 176 kHz, ``test_demo``'s two spins) beat:
their product of oscillations rises and then stays near full contrast, which
one layer fits far better than one spin, so plain forward selection took a
layer for them every time (12 of 12 synthetic evolutions of that pair) and
the protocol imaged a layer that is not there.  So before the first
component is a layer, two spins at once are tried too (the second started
from the periodogram and from the first split in two, nu (1 -/+ f)); the
pair wins when each spin brings the threshold and its deviance, charged the
threshold per component, is the lower.

:data:`DELTA_DEVIANCE_MIN` = 25: a component adds two parameters, one of
them searched over a frequency grid; 25 is 5 sigma for one parameter and,
with ~100 independent frequencies searched, leaves a false-alarm
probability below 1e-3 per evolution.  The same threshold is the evidence
for spins and layers in the rasters (``localize_spins``' deviance trail and
:func:`layer_evidence`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from numpy.typing import NDArray

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct._poisson import SweepFit, fit_sweep
from nvmri_bluesky.reconstruct.counts import GATES, check_gates, contrast_with_sigma, valid_points
from nvmri_bluesky.reconstruct.layers import layer_decay_integral

__all__ = ["DELTA_DEVIANCE_MIN", "LAYER_HEIGHTS_NM", "NOMINAL_FLIP_PROBABILITY",
           "EXCLUSION_POWER", "COUPLING_CLASS_RATIO", "EvolutionContent",
           "classify_evolution", "combine_evolutions", "detection_limit_hz", "evidence",
           "evolution_shot_factor", "extra_spin_deviance",
           "periodogram_peak", "coupling_classes", "unexcluded_couplings",
           "without_refuted_layer", "evolution_support",
           "spins_the_evolution_allows"]

DELTA_DEVIANCE_MIN = 25.0
"""Likelihood-ratio threshold 2 Delta log L for adding a spin or a layer."""
LAYER_HEIGHTS_NM = (4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 17.0, 20.0)
"""Layer heights above the NV the evolution's layer model is profiled over, nm."""
BASELINE_MAX = 0.1
"""|b|, the evolution's contrast with nothing flipped, at most this.  With no dark spin
the RF pulse leaves the signal gate equal to the echo gate (c = 0); b only takes up a
small systematic difference of the two gates (RF crosstalk on a real instrument).  A
free b would let a decay complete before the first tau (a dense layer close to a
shallow NV: c ~ 0.9 at every tau, validate seed 20) pass for "nothing"."""
NOMINAL_FLIP_PROBABILITY = 0.5
"""Flip probability assumed for the detection limit when no spectrum was measured."""
_NU_MAX_HZ = 20e6
EXCLUSION_POWER = 0.95
"""A coupling is excluded by an evolution that would have detected it (deviance drop
>= the threshold) with at least this probability (:func:`unexcluded_couplings`)."""
COUPLING_CLASS_RATIO = 2.5
"""Couplings within this ratio share one survey's free time (:func:`coupling_classes`)."""


def evidence(delta_deviance: float, threshold: float = DELTA_DEVIANCE_MIN) -> dict:
    """report.json ``evidence`` of one object: its likelihood-ratio statistic and threshold."""
    return {"statistic": "delta_deviance (2 delta log L, Poisson)",
            "value": float(delta_deviance), "threshold": float(threshold)}


@dataclass(frozen=True)
class _Evolution:
    taus: NDArray          # valid points, s
    counts: NDArray        # (4, P)
    shots: NDArray         # (P,)
    contrast: NDArray      # (P,)
    contrast_sigma: NDArray


def _evolution(ds: xr.Dataset, coord: str = "tau") -> _Evolution:
    check_gates(ds)
    ok = np.asarray(valid_points(ds).values)
    counts = np.stack([np.asarray(ds[g].values, float)[ok] for g in GATES])
    c, s = contrast_with_sigma(*counts)
    good = np.isfinite(c) & np.isfinite(s) & (s > 0)
    if good.sum() < 6:
        raise NvmriError("DEER evolution has fewer than 6 valid points")
    shots = np.broadcast_to(np.asarray(ds.attrs.get("shots", 1.0), float), ok.shape)[ok]
    return _Evolution(np.asarray(ds[coord].values, float)[ok][good], counts[:, good],
                      shots[good], c[good], s[good])


def _coupling_grid(taus_s: NDArray, nu_max_hz: float) -> NDArray:
    """Couplings searched on free times ``taus_s``: up to the sampling's limit (and
    ``nu_max_hz``), in steps that keep the phase error at the longest tau below 0.2 rad."""
    dt = float(np.min(np.diff(np.sort(taus_s))))
    nu_hi = min(nu_max_hz, 1.0 / max(dt, 1e-12))
    step = 0.2 / (np.pi * float(np.max(taus_s)))
    return np.arange(step, nu_hi + step, step)


def periodogram_peak(taus_s: NDArray, contrast: NDArray, sigma: NDArray,
                     nu_max_hz: float = _NU_MAX_HZ) -> tuple[float, float, float, float]:
    """Best single-spin curve b + A (1 - cos(pi nu tau)) by weighted least squares on a nu grid.

    Parameters
    ----------
    taus_s, contrast, sigma : ndarray
        Free times (s), contrast and its sigma.
    nu_max_hz : float
        Highest coupling searched (limited by the sampling too), Hz.

    Returns
    -------
    (chi2, nu_hz, amplitude, baseline)
    """
    t, cc, wts = np.asarray(taus_s, float), np.asarray(contrast, float), 1.0 / sigma**2
    nus = _coupling_grid(t, nu_max_hz)
    g = 1.0 - np.cos(np.pi * nus[:, None] * t[None, :])           # (n_nu, n_tau)
    s0, s1, s2 = wts.sum(), g @ wts, (g**2) @ wts
    y0, y1 = float(wts @ cc), g @ (wts * cc)
    det = s0 * s2 - s1**2
    det = np.where(np.abs(det) > 0, det, np.inf)
    amp = (s0 * y1 - s1 * y0) / det
    base = (s2 * y0 - s1 * y1) / det
    chi = float(wts @ cc**2) - 2 * (base * y0 + amp * y1) + base**2 * s0 \
        + 2 * base * amp * s1 + amp**2 * s2
    chi = np.where(amp > 0, chi, np.inf)                   # a spin only lowers the coherence
    i = int(np.argmin(chi))
    return float(chi[i]), float(nus[i]), float(amp[i]), float(base[i])


@dataclass(frozen=True)
class _Model:
    """Components of the evolution model: spins (nu MHz, A) and an optional layer height."""

    n_spins: int
    layer_height_nm: float | None

    def contrast(self, th: NDArray, taus: NDArray, jt: NDArray | None) -> NDArray:
        """c(tau) for theta = [b, (nu_MHz, A) per spin, q if a layer]."""
        coh = np.ones_like(taus)
        for j in range(self.n_spins):
            nu, amp = th[1 + 2 * j], th[2 + 2 * j]
            coh = coh * (1.0 - amp * physics.deer_weight(nu * 1e6, taus))
        if self.layer_height_nm is not None:
            coh = coh * np.exp(-th[-1] * jt)
        return th[0] + 1.0 - coh

    def bounds(self) -> tuple[NDArray, NDArray, NDArray]:
        """Lower, upper bounds and finite-difference steps."""
        lo, hi, fd = [-BASELINE_MAX], [BASELINE_MAX], [1e-4]
        for _ in range(self.n_spins):
            lo += [0.0, 0.0]
            hi += [_NU_MAX_HZ / 1e6, 1.0]
            fd += [1e-5, 1e-4]
        if self.layer_height_nm is not None:
            lo.append(0.0)
            hi.append(50.0)
            fd.append(1e-4)
        return np.array(lo), np.array(hi), np.array(fd)


def _decay_shape(taus: NDArray, height_nm: float) -> NDArray:
    """J(tau; h) / J(tau_max; h): the layer's decay shape, so q is of order 1 (q = n p0 J_max)."""
    jt = layer_decay_integral(taus, height_nm)
    return jt / max(float(np.max(jt)), 1e-300)


def _fit(ev: _Evolution, model: _Model, theta0: NDArray) -> SweepFit:
    jt = (_decay_shape(ev.taus, model.layer_height_nm)
          if model.layer_height_nm is not None else None)
    lo, hi, fd = model.bounds()
    return fit_sweep(ev.counts, ev.shots, lambda th: model.contrast(th, ev.taus, jt),
                     np.clip(theta0, lo, hi), lo, hi, fd, echo_per_point=True)


@dataclass(frozen=True)
class EvolutionContent:
    """What a tip-free DEER evolution says the sample holds.

    Attributes
    ----------
    couplings_hz, coupling_sigmas_hz, amplitudes : tuple of float
        Accepted point-spin components, strongest coupling first, Hz.
    spin_evidence : tuple of float
        Deviance drop when each spin was added (same order).
    layer : bool
        A decay (many weakly coupled spins) is accepted.
    layer_evidence : float
        Deviance drop when the layer was added (0 if not).
    layer_height_nm : float or None
        Best profiled height of the evolution's layer model (a rough guide
        only; the image measures it), nm.
    layer_rate : float
        q of the layer model, exp(-q J(tau)/J(tau_max)) is the coherence it leaves.
    tau_max_s : float
        Longest free time of the evolution, s.
    deviance_trail : tuple of (str, float)
        Accepted models and their deviances, simplest first.
    """

    couplings_hz: tuple[float, ...]
    coupling_sigmas_hz: tuple[float, ...]
    amplitudes: tuple[float, ...]
    spin_evidence: tuple[float, ...]
    layer: bool
    layer_evidence: float
    layer_height_nm: float | None
    layer_rate: float = 0.0
    tau_max_s: float = 1.0
    deviance_trail: tuple[tuple[str, float], ...] = field(default=())

    def layer_coherence(self, tau_s: NDArray) -> NDArray:
        """Coherence the layer leaves at free times ``tau_s`` (1 without a layer)."""
        taus = np.asarray(tau_s, float)
        if self.layer_height_nm is None:
            return np.ones_like(taus)
        # J on a coarse grid, interpolated (J is smooth; callers pass thousands of taus)
        grid = np.linspace(0.0, max(float(np.max(taus)), self.tau_max_s), 121)
        shape = np.interp(taus, grid, layer_decay_integral(grid, self.layer_height_nm))
        j_max = float(layer_decay_integral(np.array([self.tau_max_s]), self.layer_height_nm)[0])
        return np.exp(-self.layer_rate * shape / max(j_max, 1e-300))

    @property
    def empty(self) -> bool:
        """Neither a spin nor a layer."""
        return not self.couplings_hz and not self.layer


def _model_contrast(ev: _Evolution, model: _Model, theta: NDArray) -> NDArray:
    jt = (_decay_shape(ev.taus, model.layer_height_nm)
          if model.layer_height_nm is not None else None)
    return model.contrast(theta, ev.taus, jt)


SPLIT_FRACTIONS = (0.2, 0.35)
"""Relative splits nu (1 -/+ f) of an accepted spin tried as starts for one more spin."""


def _multiplied_peak(ev: _Evolution, coherence: NDArray, resid: NDArray
                     ) -> tuple[float, float]:
    """(nu, A) of the curve A w(nu, tau) coherence(tau) that best fits ``resid`` by
    weighted least squares (nu on the periodogram's grid; (0, 0) if no A > 0 helps)."""
    t, wts = ev.taus, 1.0 / ev.contrast_sigma**2
    nus = _coupling_grid(t, _NU_MAX_HZ)
    best = (0.0, 0.0, 0.0)
    for i in range(0, nus.size, 2000):
        d = physics.deer_weight(nus[i:i + 2000, None], t[None, :]) * coherence[None, :]
        dd, rd = (d**2) @ wts, d @ (wts * resid)
        gain = np.where((rd > 0) & (dd > 0), rd**2 / np.where(dd > 0, dd, 1.0), 0.0)
        j = int(np.argmax(gain))
        if gain[j] > best[0]:
            best = (float(gain[j]), float(nus[i + j]), float(rd[j] / dd[j]))
    return best[1], best[2]


def _spin_candidate(ev: _Evolution, model: _Model, fit: SweepFit, split: bool = False
                    ) -> tuple[_Model, SweepFit]:
    """One more spin, started at the periodogram peak of the remaining contrast; with
    ``split`` also at every spin of ``model`` split in two (nu (1 -/+ f),
    :data:`SPLIT_FRACTIONS`).  The best fit.

    Two comparable couplings (e.g. 117 and 176 kHz) beat into one periodogram peak
    between them, where the first spin's fit settles; the residual's periodogram then
    offers no start near either, while splitting that spin does.
    """
    current = _model_contrast(ev, model, fit.theta)
    resid = ev.contrast - current
    _, nu, amp, _ = periodogram_peak(ev.taus, resid, ev.contrast_sigma)
    spins = list(fit.theta[1:1 + 2 * model.n_spins])
    new = _Model(model.n_spins + 1, model.layer_height_nm)
    tail = list(fit.theta[1 + 2 * model.n_spins:])
    starts = [np.array([fit.theta[0], *spins, nu / 1e6, float(np.clip(amp, 0.02, 0.98)),
                        *tail])]
    if model.n_spins or model.layer_height_nm is not None:
        # the new spin multiplies the coherence the others leave: its curve is
        # A w(nu, tau) x that coherence, whose frequencies the plain periodogram misses
        # (it sees the products' sums and differences); the best such curve is a start too
        nu_m, amp_m = _multiplied_peak(ev, 1.0 + fit.theta[0] - current, resid)
        if nu_m > 0:
            starts.append(np.array([fit.theta[0], *spins, nu_m / 1e6,
                                    float(np.clip(amp_m, 0.02, 0.98)), *tail]))
    for j in range(model.n_spins if split else 0):
        nu_j, amp_j = spins[2 * j], float(np.clip(spins[2 * j + 1], 0.02, 0.98))
        for f in SPLIT_FRACTIONS:
            halves = list(spins)
            halves[2 * j] = nu_j * (1.0 - f)
            starts.append(np.array([fit.theta[0], *halves, nu_j * (1.0 + f), amp_j, *tail]))
    return new, min((_fit(ev, new, th0) for th0 in starts), key=lambda t: t.fit.deviance)


def _layer_candidate(ev: _Evolution, model: _Model, fit: SweepFit
                     ) -> tuple[_Model, SweepFit]:
    """The layer added at the height whose decay best explains the remaining coherence.

    The height is screened by weighted least squares of the contrast on
    :data:`LAYER_HEIGHTS_NM` (q on a grid), then one Poisson fit is made there.
    """
    base = 1.0 - _model_contrast(ev, model, fit.theta) + fit.theta[0]   # coherence kept
    wts = 1.0 / ev.contrast_sigma**2
    qs = np.geomspace(0.01, 50.0, 120)
    best = (np.inf, LAYER_HEIGHTS_NM[0], 1.0)
    for h in LAYER_HEIGHTS_NM:
        shape = _decay_shape(ev.taus, h)
        curves = fit.theta[0] + 1.0 - base[None, :] * np.exp(-qs[:, None] * shape[None, :])
        chi = ((curves - ev.contrast[None, :]) ** 2) @ wts
        i = int(np.argmin(chi))
        if chi[i] < best[0]:
            best = (float(chi[i]), h, float(qs[i]))
    new = _Model(model.n_spins, best[1])
    return new, _fit(ev, new, np.r_[fit.theta, best[2]])


def classify_evolution(ds: xr.Dataset, max_spins: int = 3,
                       threshold: float = DELTA_DEVIANCE_MIN, coord: str = "tau",
                       layers: bool = True) -> EvolutionContent:
    """Point spins, a layer, both or nothing, from a tip-free DEER evolution.

    Parameters
    ----------
    ds : xarray.Dataset
        Counts ``signal``, ``echo``, ``bright``, ``dark`` along ``coord`` (free
        time, s); attrs ``shots``.
    max_spins : int
        Most point-spin components tried.
    threshold : float
        Deviance drop a component must bring (module doc).
    coord : str
        The free-time coordinate.
    layers : bool
        Whether a layer component is tried (False: point spins or nothing).

    Returns
    -------
    EvolutionContent
    """
    ev = _evolution(ds, coord)
    model = _Model(0, None)
    fit = _fit(ev, model, np.array([0.0]))
    trail = [("flat", fit.fit.deviance)]
    spin_ev: list[float] = []
    layer_ev = 0.0
    while True:
        # (kind, model, fit, deviance gain of each component added)
        candidates: list[tuple[str, _Model, SweepFit, tuple[float, ...]]] = []
        if model.n_spins < max_spins:
            one, one_fit = _spin_candidate(ev, model, fit)
            candidates.append(("spin", one, one_fit, (fit.fit.deviance - one_fit.fit.deviance,)))
        if layers and model.layer_height_nm is None:
            new, trial = _layer_candidate(ev, model, fit)
            candidates.append(("layer", new, trial, (fit.fit.deviance - trial.fit.deviance,)))
        if (candidates and min(candidates, key=lambda c: c[2].fit.deviance)[0] == "layer"
                and model.n_spins == 0 and max_spins >= 2):
            # before a layer is taken: two spins at once.  A pair of comparable couplings
            # (a beat) looks like a decay to either one-component step, so forward
            # selection alone would take a layer for it
            two, two_fit = _spin_candidate(ev, one, one_fit, split=True)
            candidates.append(("spins", two, two_fit,
                               (fit.fit.deviance - one_fit.fit.deviance,
                                one_fit.fit.deviance - two_fit.fit.deviance)))
        # each component must bring the threshold; among those that do, the lowest
        # deviance with the threshold charged per component (a penalised likelihood)
        candidates = [c for c in candidates if min(c[3]) >= threshold]
        if not candidates:
            break
        kind, new, trial, gains = min(candidates,
                                      key=lambda c: c[2].fit.deviance + threshold * len(c[3]))
        if kind == "layer":
            layer_ev = gains[0]
        else:
            spin_ev.extend(gains)
        model, fit = new, trial
        trail.append((f"{model.n_spins} spin(s)" + (" + layer" if model.layer_height_nm
                                                     is not None else ""), fit.fit.deviance))
    nus = fit.theta[1:1 + 2 * model.n_spins:2] * 1e6
    sig = fit.theta_sigma[1:1 + 2 * model.n_spins:2] * 1e6
    amps = fit.theta[2:2 + 2 * model.n_spins:2]
    order = np.argsort(-nus)
    return EvolutionContent(
        couplings_hz=tuple(float(nus[i]) for i in order),
        coupling_sigmas_hz=tuple(float(sig[i]) for i in order),
        amplitudes=tuple(float(amps[i]) for i in order),
        spin_evidence=tuple(spin_ev[i] if i < len(spin_ev) else 0.0 for i in order),
        layer=model.layer_height_nm is not None, layer_evidence=float(layer_ev),
        layer_height_nm=model.layer_height_nm,
        layer_rate=float(fit.theta[-1]) if model.layer_height_nm is not None else 0.0,
        tau_max_s=float(np.max(ev.taus)), deviance_trail=tuple(trail))


def without_refuted_layer(ds: xr.Dataset, content: EvolutionContent) -> EvolutionContent:
    """``content`` once the layer it found was refuted by its own image.

    A decay that is no layer may be point spins that beat (e.g. two weak
    couplings beside a strong one, which one layer fits a little better than
    one more spin).  The evolution is classified again with no layer allowed;
    if that finds couplings, they are the content, else ``content`` stays.
    """
    if not content.layer:
        return content
    reread = classify_evolution(ds, layers=False)
    return reread if reread.couplings_hz else content


COUPLING_FREEDOM = 0.2
"""In :func:`evolution_support` each located coupling may move by this fraction: the
raster's coupling comes from the fitted offset (nu ~ 1/r^3: 0.1 nm at 8 nm is 4 %)
and its DEER weight, while the evolution, out to 30 us, resolves a few kHz (validate
seed 29: 129 kHz reported for a 141 kHz spin; at 129 kHz the evolution contradicts
it, at 141 kHz it supports it by 1467)."""


def _known_spins_deviance(ev: _Evolution, couplings_hz: tuple[float, ...], p0: float,
                          layer_height_nm: float | None) -> float:
    """Deviance of the evolution with spins of the given couplings (each within
    :data:`COUPLING_FREEDOM`) flipped with probability p0; b (and the layer's q) free."""
    nus = np.abs(np.asarray(couplings_hz, float)) / 1e6                 # MHz
    k = nus.size
    shape = (_decay_shape(ev.taus, layer_height_nm) if layer_height_nm is not None
             else np.zeros_like(ev.taus))
    n_q = int(layer_height_nm is not None)
    lo = np.r_[-BASELINE_MAX, [0.0] * n_q, nus * (1 - COUPLING_FREEDOM)]
    hi = np.r_[BASELINE_MAX, [50.0] * n_q, nus * (1 + COUPLING_FREEDOM)]
    fd = np.r_[1e-4, [1e-4] * n_q, np.full(k, 1e-5)]

    def contrast(th: NDArray) -> NDArray:
        q = th[1] if n_q else 0.0
        coh = physics.deer_coherence(ev.taus, np.full(k, p0), th[1 + n_q:] * 1e6, t2_s=np.inf)
        return th[0] + 1.0 - coh * np.exp(-q * shape)

    # starts: the reported couplings, and each moved by -/+ half the freedom (an
    # oscillation's deviance has many local minima in nu)
    starts = [nus] + [nus * np.where(np.arange(k) == j, 1 + sign * COUPLING_FREEDOM / 2, 1)
                      for j in range(k) for sign in (-1, 1)]
    return min(fit_sweep(ev.counts, ev.shots, contrast, np.r_[0.0, [1.0] * n_q, start],
                         lo, hi, fd, echo_per_point=True).fit.deviance for start in starts)


def evolution_support(ds: xr.Dataset, couplings_hz: tuple[float, ...], flip_probability: float,
                      layer_height_nm: float | None = None, coord: str = "tau"
                      ) -> tuple[float, ...]:
    """What the tip-free evolution says of each point spin located in the rasters.

    The rasters and the evolution are independent data on the same spins: a
    spin at offset r has the coupling nu(r) that its raster fit reports, and
    the tip-free evolution, flipping every spin on the line with the same
    probability p0, must show its factor 1 - p0 (1 - cos(pi nu tau)).  For
    each coupling k this returns the evolution's likelihood-ratio statistic

        S_k = D(all couplings but k) - D(all couplings),

    the evolution fitted with the couplings as known factors, a baseline and,
    with a layer, its decay at the imaged height (rate free) as in
    :func:`classify_evolution`.  S_k adds to the raster's 2 Delta log L (the
    log-likelihoods of independent data add): a spin the evolution cannot see
    (weak, or hidden by a layer's decay) has S_k ~ 0; a spin whose
    oscillation the evolution would show and does not has S_k << 0 (e.g. a
    layer's misfit image taken for a spin).

    Parameters
    ----------
    ds : xarray.Dataset
        The tip-free evolution (counts along ``coord``, attrs ``shots``).
    couplings_hz : tuple of float
        The located spins' couplings (sign ignored), Hz.
    flip_probability : float
        p0, the dark-spin line's on-resonance flip probability.
    layer_height_nm : float, optional
        A layer found on the same NV: its decay enters both models.
    coord : str

    Returns
    -------
    tuple of float
        S_k per coupling, in the order given.
    """
    ev = _evolution(ds, coord)
    nus = tuple(float(v) for v in couplings_hz)
    full = _known_spins_deviance(ev, nus, flip_probability, layer_height_nm)
    return tuple(_known_spins_deviance(ev, nus[:k] + nus[k + 1:], flip_probability,
                                       layer_height_nm) - full for k in range(len(nus)))


def spins_the_evolution_allows(ds: xr.Dataset, couplings_hz: tuple[float, ...],
                               raster_evidence: tuple[float, ...], flip_probability: float,
                               layer_height_nm: float | None = None,
                               threshold: float = DELTA_DEVIANCE_MIN
                               ) -> tuple[tuple[float, ...], tuple[bool, ...]]:
    """Each located spin's evidence from rasters and evolution together.

    A spin is kept while its raster 2 Delta log L plus the evolution's
    :func:`evolution_support` reaches ``threshold``; the spin with the lowest
    total below it is dropped first and the others' support is computed again
    without it (a dropped spin's factor no longer explains the evolution).

    Parameters
    ----------
    ds : xarray.Dataset
        The tip-free evolution.
    couplings_hz, raster_evidence : tuple of float
        Per located spin: its coupling (Hz) and the raster fit's deviance drop.
    flip_probability : float
    layer_height_nm : float, optional
    threshold : float
        The rasters' spin threshold.

    Returns
    -------
    (support, kept)
        Per spin, in the order given: S_k (from the last model that held it)
        and whether it is kept.
    """
    n = len(couplings_hz)
    keep = list(range(n))
    support = [0.0] * n
    while keep:
        parts = evolution_support(ds, tuple(couplings_hz[i] for i in keep), flip_probability,
                                  layer_height_nm)
        for i, s_k in zip(keep, parts, strict=True):
            support[i] = s_k
        totals = [raster_evidence[i] + support[i] for i in keep]
        worst = int(np.argmin(totals))
        if totals[worst] >= threshold:
            break
        keep.pop(worst)
    return tuple(support), tuple(i in keep for i in range(n))


def coupling_classes(couplings_hz: tuple[float, ...], ratio: float = COUPLING_CLASS_RATIO
                     ) -> list[float]:
    """Couplings that need a survey of their own: each at least ``ratio`` below the previous.

    One DEER free time serves couplings within ``ratio`` of each other (their
    weights 1 - cos(pi nu tau) are both large); a weaker spin needs a longer
    tau.  Returns the representative (strongest) coupling of each class, Hz.
    """
    classes: list[float] = []
    for nu in sorted((abs(v) for v in couplings_hz), reverse=True):
        if not classes or nu * ratio <= classes[-1]:
            classes.append(nu)
    return classes


def detection_limit_hz(ds: xr.Dataset, flip_probability: float = NOMINAL_FLIP_PROBABILITY,
                       threshold: float = DELTA_DEVIANCE_MIN, coord: str = "tau") -> float:
    """Weakest coupling a lone spin could have and still pass the evolution's threshold.

    The expected deviance drop of a spin coupled by nu is, to leading order,
    sum_tau [p (1 - cos(pi nu tau)) / sigma_c(tau)]^2 with the measured
    contrast sigmas; the limit is the smallest nu (on a 1 kHz grid up to
    20 MHz) where it reaches ``threshold``.

    Parameters
    ----------
    ds : xarray.Dataset
        The tip-free evolution.
    flip_probability : float
        On-resonance flip probability (the spectrum's peak), default nominal.
    threshold : float
    coord : str

    Returns
    -------
    float
        Hz (inf if no coupling up to 20 MHz would pass).
    """
    ev = _evolution(ds, coord)
    nus = np.arange(1e3, _NU_MAX_HZ, 1e3)
    expected = np.empty(nus.size)
    for i in range(0, nus.size, 2000):
        w = physics.deer_weight(nus[i:i + 2000, None], ev.taus[None, :])
        expected[i:i + 2000] = np.sum((flip_probability * w / ev.contrast_sigma) ** 2, axis=1)
    passing = np.nonzero(expected >= threshold)[0]
    return float(nus[passing[0]]) if passing.size else float("inf")


def _content_model(content: EvolutionContent) -> tuple[_Model, NDArray]:
    """The accepted model of ``content`` and its parameters (baseline 0: it enters linearly)."""
    th = [0.0]
    for nu, amp in zip(content.couplings_hz, content.amplitudes, strict=True):
        th += [abs(nu) / 1e6, amp]
    if content.layer:
        th.append(content.layer_rate)
    return _Model(len(content.couplings_hz), content.layer_height_nm), np.array(th)


def extra_spin_deviance(ds: xr.Dataset, content: EvolutionContent, nus_hz: NDArray,
                        flip_probability: float | None = None, coord: str = "tau") -> NDArray:
    """Expected deviance drop one more spin of coupling nu would bring beside ``content``.

    The accepted components multiply the new spin's oscillation: its contrast
    is c_new - c = p w(nu, tau) prod_j [1 - A_j w(nu_j, tau)] (x the layer's
    decay), so beside strongly flipped spins a weak one leaves far less signal
    than alone (two spins flipped with p ~ 0.5 keep ~15 % of its power on
    average).  Linearised (a Gauss-Newton step), the expected drop is the
    squared norm of that difference, weighted by the measured contrast sigmas,
    after projecting out what the accepted model's own parameters (baseline,
    each spin's nu and A, the layer's rate) can absorb.

    Parameters
    ----------
    ds : xarray.Dataset
        The tip-free evolution ``content`` was read from.
    content : EvolutionContent
        Its accepted components.
    nus_hz : array_like
        Couplings of the extra spin, Hz.
    flip_probability : float, optional
        The extra spin's amplitude; default the median of the accepted spins'
        amplitudes (every point spin is on the same line), else nominal.
    coord : str

    Returns
    -------
    ndarray
        Expected 2 Delta log L per coupling.
    """
    ev = _evolution(ds, coord)
    model, th = _content_model(content)
    if flip_probability is None:
        flip_probability = (float(np.median(content.amplitudes)) if content.amplitudes
                            else NOMINAL_FLIP_PROBABILITY)
    jt = (_decay_shape(ev.taus, model.layer_height_nm)
          if model.layer_height_nm is not None else None)
    base = model.contrast(th, ev.taus, jt)
    _, _, fd = model.bounds()
    cols = [np.ones_like(ev.taus)]                   # the baseline
    for k in range(1, th.size):                      # the other parameters, central differences
        h = np.zeros_like(th)
        h[k] = fd[k]
        cols.append((model.contrast(th + h, ev.taus, jt) - model.contrast(th - h, ev.taus, jt))
                    / (2 * fd[k]))
    jac = np.stack(cols, axis=1) / ev.contrast_sigma[:, None]
    q, _ = np.linalg.qr(jac)
    coherence = 1.0 + th[0] - base                   # what the accepted components leave
    nus = np.atleast_1d(np.asarray(nus_hz, float))
    out = np.empty(nus.size)
    for i in range(0, nus.size, 2000):
        d = (flip_probability * physics.deer_weight(nus[i:i + 2000, None], ev.taus[None, :])
             * coherence[None, :] / ev.contrast_sigma[None, :])
        d = d - (d @ q) @ q.T
        out[i:i + 2000] = np.sum(d**2, axis=1)
    return out


def _uncovered(couplings_hz: tuple[float, ...], nu_min_hz: float, ratio: float) -> NDArray:
    """Couplings (1 kHz grid, from ``nu_min_hz``) below every class's survey, Hz."""
    top = min(coupling_classes(couplings_hz, ratio)) / ratio
    return np.arange(nu_min_hz, top, 1e3)


def _excluding_deviance(threshold: float, power: float) -> float:
    """Expected deviance drop detected with probability ``power``: (sqrt(T) + z_power)^2."""
    from scipy.stats import norm

    return float((np.sqrt(threshold) + norm.ppf(power)) ** 2)


def evolution_shot_factor(ds: xr.Dataset, content: EvolutionContent,
                          couplings_hz: tuple[float, ...] | None = None,
                          nu_min_hz: float = 50e3, ratio: float = COUPLING_CLASS_RATIO,
                          power: float = EXCLUSION_POWER,
                          threshold: float = DELTA_DEVIANCE_MIN,
                          flip_probability: float | None = None, coord: str = "tau") -> float:
    """How many times the evolution's shots would exclude every coupling below the classes.

    The expected deviance drop of an extra spin (:func:`extra_spin_deviance`)
    grows in proportion to the shots (the contrast variance falls as 1/N), so
    the factor is (sqrt(threshold) + z_power)^2 over the smallest expected drop
    among the couplings no class surveys (from ``nu_min_hz`` to the weakest
    class / ``ratio``): 1.0 when none is left, inf when one leaves no signal.
    The arguments are those of :func:`unexcluded_couplings`.
    """
    surveyed = tuple(content.couplings_hz if couplings_hz is None else couplings_hz)
    if not surveyed:
        return 1.0
    nus = _uncovered(surveyed, nu_min_hz, ratio)
    if nus.size == 0:
        return 1.0
    weakest = float(np.min(extra_spin_deviance(ds, content, nus, flip_probability, coord)))
    needed = _excluding_deviance(threshold, power)
    return max(1.0, needed / weakest) if weakest > 0 else float("inf")


def combine_evolutions(datasets: list[xr.Dataset], coord: str = "tau") -> xr.Dataset:
    """Several tip-free evolutions at the same free times as one: counts and shots add.

    The gates' counts are Poisson sums of the same means per shot (the same
    sample, RF and free times), so the sum is the evolution of all the shots.

    Raises
    ------
    NvmriError
        If the runs' free times differ.
    """
    first = datasets[0]
    for other in datasets[1:]:
        if np.shape(other[coord]) != np.shape(first[coord]) or not np.allclose(
                other[coord].values, first[coord].values, rtol=1e-9, atol=0.0):
            raise NvmriError("the DEER evolutions to combine have different free times")
    out = first.copy()
    for g in GATES:
        out[g] = sum(d[g] for d in datasets)
    out.attrs["shots"] = float(sum(float(d.attrs.get("shots", 1.0)) for d in datasets))
    return out


def unexcluded_couplings(ds: xr.Dataset, content: EvolutionContent,
                         couplings_hz: tuple[float, ...] | None = None,
                         nu_min_hz: float = 50e3, ratio: float = COUPLING_CLASS_RATIO,
                         power: float = EXCLUSION_POWER,
                         threshold: float = DELTA_DEVIANCE_MIN,
                         flip_probability: float | None = None, coord: str = "tau"
                         ) -> tuple[float, ...]:
    """Couplings a spin survey must be designed for because the evolution cannot exclude them.

    A coupling nu (from ``nu_min_hz``, the weakest of the searched prior, up)
    is *excluded* when one more spin of that coupling, beside the accepted
    components, would have passed the threshold with probability >= ``power``:
    its expected deviance drop (:func:`extra_spin_deviance`) is at least
    (sqrt(threshold) + z_power)^2 (the likelihood ratio of one added
    amplitude, sqrt(2 Delta log L) ~ N(sqrt(expected), 1); 44.2 for 25 and
    95 %).  Couplings within ``ratio`` below a surveyed class are imaged by
    that class's survey (:func:`coupling_classes`); below the weakest class,
    the strongest coupling not excluded becomes a class of its own, and so on
    down to ``nu_min_hz``.

    A weak spin beside strong ones is what this finds: seed 25 of ``nvmri
    validate`` (310 and 232 kHz seen, a 63 kHz spin beside them expected to
    bring a drop of ~15 at the evolution's 200 000 shots, against ~290 alone).

    Parameters
    ----------
    ds : xarray.Dataset
        The tip-free evolution.
    content : EvolutionContent
        Its model choice.
    couplings_hz : tuple of float, optional
        Couplings the surveys are designed for already; default the content's.
    nu_min_hz : float
        Weakest coupling searched, Hz.
    ratio, power, threshold : float
    flip_probability : float, optional
        As :func:`extra_spin_deviance`.
    coord : str

    Returns
    -------
    tuple of float
        Extra couplings to survey for, strongest first, Hz (empty if none).
    """
    surveyed = tuple(content.couplings_hz if couplings_hz is None else couplings_hz)
    if not surveyed:
        return ()
    needed = _excluding_deviance(threshold, power)
    nus = _uncovered(surveyed, nu_min_hz, ratio)
    if nus.size == 0:
        return ()
    hidden = nus[extra_spin_deviance(ds, content, nus, flip_probability, coord) < needed]
    extra: list[float] = []
    while hidden.size:
        nu = float(hidden.max())
        extra.append(nu)
        hidden = hidden[hidden * ratio <= nu]
    return tuple(extra)
