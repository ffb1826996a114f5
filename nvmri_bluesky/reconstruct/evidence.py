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

What the evolution says beyond its content (support for the spins the rasters
located, the couplings it excludes, the surveys and shots still needed):
:mod:`.crosscheck`.
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

__all__ = ["DELTA_DEVIANCE_MIN", "LAYER_HEIGHTS_NM", "EvolutionContent", "classify_evolution",
           "evidence", "periodogram_peak", "without_refuted_layer"]

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
_NU_MAX_HZ = 20e6


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


