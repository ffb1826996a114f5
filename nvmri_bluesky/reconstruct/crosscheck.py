"""The tip-free DEER evolution beyond its own content (:mod:`.evidence`).

* Support for the spins the rasters located: each located coupling's factor
  1 - p0 (1 - cos(pi nu tau)) must show in the evolution
  (:func:`evolution_support`, :func:`spins_the_evolution_allows`).
* What it excludes: the weakest lone spin it would have detected
  (:func:`detection_limit_hz`), the deviance one more spin would bring
  (:func:`extra_spin_deviance`) and the couplings it does not exclude with
  :data:`EXCLUSION_POWER` (:func:`unexcluded_couplings`).
* What to measure next: couplings that need a survey of their own
  (:func:`coupling_classes`), the shots that would exclude what is left
  (:func:`evolution_shot_factor`) and the evolutions' counts added
  (:func:`combine_evolutions`).

Every statistic is a Poisson likelihood ratio 2 Delta log L with the threshold
:data:`~.evidence.DELTA_DEVIANCE_MIN`.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from numpy.typing import NDArray

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct._poisson import fit_sweep
from nvmri_bluesky.reconstruct.counts import GATES
from nvmri_bluesky.reconstruct.evidence import (
    _NU_MAX_HZ,
    BASELINE_MAX,
    DELTA_DEVIANCE_MIN,
    EvolutionContent,
    _decay_shape,
    _Evolution,
    _evolution,
    _Model,
)

__all__ = ["NOMINAL_FLIP_PROBABILITY", "EXCLUSION_POWER", "COUPLING_CLASS_RATIO",
           "COUPLING_FREEDOM", "evolution_support", "spins_the_evolution_allows",
           "coupling_classes", "detection_limit_hz", "extra_spin_deviance",
           "evolution_shot_factor", "combine_evolutions", "unexcluded_couplings"]


NOMINAL_FLIP_PROBABILITY = 0.5
"""Flip probability assumed for the detection limit when no spectrum was measured."""


EXCLUSION_POWER = 0.95
"""A coupling is excluded by an evolution that would have detected it (deviance drop
>= the threshold) with at least this probability (:func:`unexcluded_couplings`)."""


COUPLING_CLASS_RATIO = 2.5
"""Couplings within this ratio share one survey's free time (:func:`coupling_classes`)."""


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
