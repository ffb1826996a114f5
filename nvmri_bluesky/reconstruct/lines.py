"""Tip-free dark-spin line fits (piece 2 of the PSF, see :mod:`.psf`).

A tip-free ``deer_spectrum`` (RF sweep) is fitted with a Lorentzian
(:func:`fit_lorentzian`: centre f_dark0, FWHM, amplitude) and with the
pi-pulse flip-probability model of physics.md, ``physics.dark_flip_probability``
with the known RF pulse length and the dark-spin T2* free
(:func:`fit_flip_line` -> :class:`FlipLine`; from the counts,
:func:`fit_deer_spectrum`).  The flip model's T2* is what the PSF uses ("the
measured line width").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.counts import check_gates, deer_contrast_dataset, valid_points

__all__ = ["FlipLine", "LorentzianFit", "fit_lorentzian", "fit_flip_line", "fit_deer_spectrum",
           "SHARED_COUPLING_SIGMAS",
           "point_weights"]


@dataclass(frozen=True)
class FlipLine:
    """Tip-free dark-spin RF response: p(Delta) = physics.dark_flip_probability.

    Attributes
    ----------
    centre_hz : float
        f_dark0, the tip-free dark-spin line centre, Hz.
    t2_star_s : float
        Dark-spin T2* (Lorentzian FWHM 1/T2*) fitted with the pulse length fixed, s.
    t_pi_s : float
        RF pi-pulse length (the ``rf_duration_s`` of the runs), s.
    amplitude : float
        Fitted amplitude of the spectrum (w for a single spin; the scale s of the
        known weights for several point spins, :func:`fit_deer_spectrum`), dimensionless.
    centre_sigma_hz, t2_star_sigma_s, amplitude_sigma : float
        One-sigma uncertainties (0 when the line was given, not fitted).
    """

    centre_hz: float
    t2_star_s: float = 150e-9
    t_pi_s: float = 100e-9
    amplitude: float = float("nan")
    centre_sigma_hz: float = 0.0
    t2_star_sigma_s: float = 0.0
    amplitude_sigma: float = 0.0

    def probability(self, detuning_hz: ArrayLike) -> NDArray:
        """Flip probability at detuning f_rf - f_spin (Hz), any shape."""
        return physics.dark_flip_probability(detuning_hz, self.t_pi_s, self.t2_star_s)

    def derivative(self, detuning_hz: ArrayLike) -> NDArray:
        """dp/dDelta, 1/Hz, by a central difference of 2 % of the FWHM."""
        h = 0.02 * self.fwhm_hz
        d = np.asarray(detuning_hz, float)
        return (self.probability(d + h) - self.probability(d - h)) / (2.0 * h)

    @property
    def peak(self) -> float:
        """p(0), the on-resonance flip probability."""
        return float(self.probability(0.0))

    @property
    def fwhm_hz(self) -> float:
        """Full width at half maximum of p, Hz (numerical)."""
        return _flip_fwhm(self.t_pi_s, self.t2_star_s)



def _flip_fwhm(t_pi_s: float, t2s_s: float) -> float:
    span = 4.0 * (1.0 / t_pi_s + 1.0 / t2s_s)
    d = np.linspace(0.0, span, 20001)
    p = physics.dark_flip_probability(d, t_pi_s, t2s_s)
    half = 0.5 * p[0]
    i = int(np.argmax(p < half))
    x0, x1, p0, p1 = d[i - 1], d[i], p[i - 1], p[i]
    return float(2.0 * (x0 + (half - p0) * (x1 - x0) / (p1 - p0)))



@dataclass(frozen=True)
class LorentzianFit:
    """Lorentzian fit ``baseline + amplitude * physics.lorentzian(f - centre, fwhm)``.

    Attributes (each with a ``*_sigma`` one-sigma uncertainty): ``centre_hz``,
    ``fwhm_hz``, ``amplitude``, ``baseline``; ``chi2_reduced`` of the fit
    (sigmas are scaled by sqrt(chi2_reduced) when it exceeds 1).
    """

    centre_hz: float
    fwhm_hz: float
    amplitude: float
    baseline: float
    centre_sigma_hz: float
    fwhm_sigma_hz: float
    amplitude_sigma: float
    baseline_sigma: float
    chi2_reduced: float



def _initial_peak(f: NDArray, y: NDArray) -> tuple[float, float, float, float]:
    order = np.argsort(f)
    f, y = f[order], y[order]
    base = float(np.median(y))
    k = max(1, len(y) // 15)
    sm = np.convolve(y - base, np.ones(k) / k, mode="same")
    i = int(np.argmax(sm))
    amp = float(sm[i])
    above = np.where(sm >= 0.5 * amp)[0]
    width = float(f[above.max()] - f[above.min()]) if above.size > 1 else float(np.ptp(f)) / 10
    return float(f[i]), max(width, 2.0 * float(np.median(np.diff(f)))), amp, base



def _finite_sigma(x: NDArray, y: NDArray, s: NDArray | None) -> tuple[NDArray, ...]:
    s = np.ones_like(y) if s is None else np.broadcast_to(np.asarray(s, float), y.shape)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(s) & (s > 0)
    if ok.sum() < 5:
        raise NvmriError("fewer than 5 valid points to fit a line")
    return x[ok], y[ok], s[ok]



def fit_lorentzian(frequency_hz: ArrayLike, value: ArrayLike,
                   sigma: ArrayLike | None = None,
                   initial: tuple[float, float, float, float] | None = None) -> LorentzianFit:
    """Weighted least-squares Lorentzian fit of a resonance peak (e.g. an ESR sweep).

    Parameters
    ----------
    frequency_hz : array_like, shape (n,)
        Sweep axis (any unit; results in the same unit).
    value : array_like, shape (n,)
        Peak-up signal (e.g. DEER contrast).
    sigma : array_like, optional
        One-sigma errors of ``value`` (default 1: then the sigmas come from
        the residual scatter).
    initial : (centre, fwhm, amplitude, baseline), optional
        Start values (default: from the smoothed maximum and half-width).

    Returns
    -------
    LorentzianFit

    Raises
    ------
    NvmriError
        If the fit does not converge.
    """
    x, y, s = _finite_sigma(np.asarray(frequency_hz, float), np.asarray(value, float),
                            None if sigma is None else np.asarray(sigma, float))
    c0, w0, a0, b0 = _initial_peak(x, y) if initial is None else initial

    def model(f, c, w, a, b):
        return b + a * physics.lorentzian(f - c, abs(w))

    try:
        popt, pcov = optimize.curve_fit(model, x, y, p0=[c0, w0, a0, b0], sigma=s,
                                        absolute_sigma=True, maxfev=20000)
    except (RuntimeError, optimize.OptimizeWarning) as exc:
        raise NvmriError(f"Lorentzian fit did not converge: {exc}") from None
    chi2 = float(np.sum(((y - model(x, *popt)) / s) ** 2) / max(len(x) - 4, 1))
    err = np.sqrt(np.diag(pcov)) * (np.sqrt(max(chi2, 1.0)) if sigma is not None
                                    else np.sqrt(chi2))
    return LorentzianFit(centre_hz=float(popt[0]), fwhm_hz=float(abs(popt[1])),
                         amplitude=float(popt[2]), baseline=float(popt[3]),
                         centre_sigma_hz=float(err[0]), fwhm_sigma_hz=float(err[1]),
                         amplitude_sigma=float(err[2]), baseline_sigma=float(err[3]),
                         chi2_reduced=chi2)



def fit_flip_line(frequency_hz: ArrayLike, value: ArrayLike, sigma: ArrayLike | None,
                  t_pi_s: float, model: Literal["single", "bath"] = "single",
                  baseline: bool = True) -> FlipLine:
    """Fit the flip-probability line model to a tip-free DEER spectrum.

    ``single``: c(f) = b + A p(f - f0) (one coupled spin, A = w).
    ``bath``:   c(f) = b + 1 - exp(-A p(f - f0)) (ensemble average over a
    Poisson bath of spins, which saturates; A = sum of w).
    p = ``physics.dark_flip_probability(., t_pi_s, T2*)`` with T2* free.

    Parameters
    ----------
    frequency_hz, value, sigma : array_like, shape (n,)
        RF frequencies (Hz), DEER contrast and its one-sigma errors.
    t_pi_s : float
        RF pi-pulse length of the sweep, s.
    model : {"single", "bath"}
    baseline : bool
        Fit a constant baseline b (else b = 0).

    Returns
    -------
    FlipLine
        Centre = f_dark0 and T2* with sigmas (scaled by sqrt(chi2_red) if > 1).
    """
    x, y, s = _finite_sigma(np.asarray(frequency_hz, float), np.asarray(value, float),
                            None if sigma is None else np.asarray(sigma, float))
    c0, w0, a_lor, b_lor = _initial_peak(x, y)
    scale = 1e6
    width0 = 1.0 / 150e-9
    omega = 1.0 / (2.0 * t_pi_s)
    # guess the Lorentzian width from the peak's width minus the pulse broadening
    gamma0 = float(np.clip(w0 - 1.2 * omega, 0.3 * width0, 10.0 * width0))

    def curve(p: NDArray) -> NDArray:
        c, log_g, a = p[0] * scale, p[1], p[2]
        b = p[3] if baseline else 0.0
        prob = physics.dark_flip_probability(x - c, t_pi_s, 1.0 / np.exp(log_g))
        core = a * prob if model == "single" else 1.0 - np.exp(-a * prob)
        return b + core

    def resid(p: NDArray) -> NDArray:
        return (y - curve(p)) / s

    peak0 = float(physics.dark_flip_probability(0.0, t_pi_s, 1.0 / gamma0))
    a0 = max(a_lor, 1e-3) / peak0
    if model == "bath":
        a0 = -np.log(max(1.0 - min(a_lor, 0.95), 1e-3)) / peak0
    p0 = [c0 / scale, np.log(gamma0), a0] + ([b_lor] if baseline else [])
    lo = [-np.inf, np.log(1e4), 0.0] + ([-np.inf] if baseline else [])
    hi = [np.inf, np.log(1e9), np.inf] + ([np.inf] if baseline else [])
    res = optimize.least_squares(resid, p0, bounds=(lo, hi), x_scale="jac",
                                 diff_step=1e-4)
    dof = max(len(x) - len(p0), 1)
    chi2 = float(np.sum(res.fun**2) / dof)
    try:
        cov = np.linalg.inv(res.jac.T @ res.jac) * max(chi2, 1.0)
        err = np.sqrt(np.diag(cov))
    except np.linalg.LinAlgError:
        err = np.full(len(p0), np.nan)
    t2s = 1.0 / np.exp(res.x[1])
    return FlipLine(centre_hz=float(res.x[0] * scale), t2_star_s=float(t2s), t_pi_s=float(t_pi_s),
                    amplitude=float(res.x[2]), centre_sigma_hz=float(err[0] * scale),
                    t2_star_sigma_s=float(t2s * err[1]), amplitude_sigma=float(err[2]))



SHARED_COUPLING_SIGMAS = 3.0
"""One spin flips the NV's coherence by at most its w = 1 - cos(pi nu tau): a one-spin
line whose amplitude exceeds the evolution's one coupling's w by this many sigma is
several spins sharing that coupling (:func:`fit_deer_spectrum`)."""


def point_weights(ds: xr.Dataset) -> NDArray | None:
    """DEER weights w_j = 1 - cos(pi nu_j tau) at the run's tau of the point spins the
    tip-free evolution saw (attr ``point_couplings_hz``, written by the protocol into
    the run's start document); None for a run without them."""
    nu = np.atleast_1d(np.asarray(ds.attrs.get("point_couplings_hz", ()), float))
    if nu.size == 0 or "tau_s" not in ds.attrs:
        return None
    return physics.deer_weight(np.abs(nu), float(ds.attrs["tau_s"]))


def fit_deer_spectrum(ds: xr.Dataset, coord: str = "rf_frequency",
                      model: Literal["single", "bath"] = "single"
                      ) -> tuple[LorentzianFit, FlipLine]:
    """Fit a tip-free ``deer_spectrum`` run: Lorentzian and flip-probability line.

    The Lorentzian is a weighted least-squares fit of the contrast (centre,
    FWHM, amplitude for the report).  The flip line (centre f_dark0, T2*,
    amplitude, baseline; model as :func:`fit_flip_line`) is fitted to the four
    gates' counts by Poisson maximum likelihood (one echo coherence for the
    sweep), so it is unbiased however noisy the contrast ratio is.

    Several point spins (``model="single"`` on a run whose start document
    names the evolution's couplings, :func:`point_weights`) flip together:
    the contrast is 1 - prod_j [1 - s w_j p(Delta)], w_j = 1 - cos(pi nu_j
    tau) known and one scale s fitted (the FlipLine's ``amplitude``).  Read
    as one spin, two spins of w ~ 2 give a flat-topped line that a single
    p(Delta) fits ~3x too wide (validate seed 52: T2* 47 ns for 150 ns,
    amplitude 4.3), and every raster's rings with it.  When the evolution saw
    one coupling but the one-spin amplitude exceeds its w (by
    ``SHARED_COUPLING_SIGMAS``), k = 2 or 3 spins share it (unresolved
    couplings, validate seed 4: 158 and 167 kHz seen as one 161 kHz, amplitude
    3.1 for w = 2.0), k by the likelihood.  The spectrum alone hardly tells a
    broad line from a flat-topped one (2 delta log L ~ 5 either way on 81
    points), the amplitude bound does.

    Parameters
    ----------
    ds : xarray.Dataset
        Counts ``signal``, ``echo``, ``bright``, ``dark`` along ``coord`` (RF
        frequency, Hz); attrs ``rf_duration_s`` (the RF pi pulse, s), ``shots``.
    coord : str
        Name of the RF-frequency coordinate.
    model : {"single", "bath"}

    Returns
    -------
    (LorentzianFit, FlipLine)
    """
    from nvmri_bluesky.reconstruct._poisson import fit_sweep

    check_gates(ds)
    if coord not in ds.coords:
        raise NvmriError(f"DEER spectrum lacks the coordinate {coord!r}")
    con = deer_contrast_dataset(ds)
    f = np.asarray(ds[coord].values, float)
    c, s = con["contrast"].values, con["contrast_sigma"].values
    t_pi = float(ds.attrs.get("rf_duration_s", 100e-9))
    valid = np.asarray(valid_points(ds).values)
    counts = np.stack([np.asarray(ds[g].values, float)[valid]
                       for g in ("signal", "echo", "bright", "dark")])
    shots = np.broadcast_to(np.asarray(ds.attrs.get("shots", 1.0), float), valid.shape)[valid]
    fv = f[valid]
    ok = np.isfinite(c) & np.isfinite(s)
    if ok.sum() < 5:
        raise NvmriError("fewer than 5 valid points in the DEER spectrum")
    ref, w0, a_pk, b0 = _initial_peak(f[ok], c[ok])
    omega = 1.0 / (2.0 * t_pi)
    gamma0 = float(np.clip(w0 - 1.2 * omega, 2e6, 70e6))
    peak0 = float(physics.dark_flip_probability(0.0, t_pi, 1.0 / gamma0))
    a0 = max(a_pk, 1e-3) / peak0
    if model == "bath":
        a0 = -np.log(max(1.0 - min(a_pk, 0.95), 1e-3)) / peak0

    def fit_with(weights: NDArray | None) -> tuple[Any, Callable[[NDArray, NDArray], NDArray]]:
        def core(th: NDArray, prob: NDArray) -> NDArray:
            if weights is not None:
                return 1.0 - np.prod(1.0 - th[2] * weights[:, None] * prob, axis=0)
            return th[2] * prob if model == "single" else 1.0 - np.exp(-th[2] * prob)

        def curve(th: NDArray) -> NDArray:
            prob = physics.dark_flip_probability(fv - ref - th[0] * 1e6, t_pi, 1e-6 / th[1])
            return th[3] + core(th, prob)

        th0 = np.array([0.0, gamma0 / 1e6, a0 if weights is None else 1.0, b0])
        return fit_sweep(counts, shots, curve, th0, np.array([-np.inf, 0.01, 0.0, -1.0]),
                         np.array([np.inf, 1e3, np.inf, 1.0]),
                         np.array([0.02, 0.01, 1e-3, 1e-4]), echo_per_point=False), core

    known = point_weights(ds) if model == "single" else None
    fit, core = fit_with(known if known is not None and known.size > 1 else None)
    if (known is not None and known.size == 1     # one coupling seen, but more than one spin
            and fit.theta[2] > known[0] + SHARED_COUPLING_SIGMAS * fit.theta_sigma[2]):
        fit, core = min((fit_with(np.full(k, known[0])) for k in (2, 3)),
                        key=lambda trial: trial[0].fit.deviance)
    g, sg = fit.theta[1], fit.theta_sigma[1]
    if not fit.theta[2] > 5.0 * fit.theta_sigma[2]:
        raise NvmriError(f"no significant dark-spin line in the DEER spectrum (amplitude "
                         f"{fit.theta[2]:.3g} +/- {fit.theta_sigma[2]:.2g}); is tau_s a "
                         "node of the coupling?")
    if not (fv.min() < ref + fit.theta[0] * 1e6 < fv.max()):
        raise NvmriError("the fitted dark-spin line centre lies outside the RF sweep")
    line = FlipLine(centre_hz=float(ref + fit.theta[0] * 1e6), t2_star_s=float(1e-6 / g),
                    t_pi_s=t_pi, amplitude=float(fit.theta[2]),
                    centre_sigma_hz=float(fit.theta_sigma[0] * 1e6),
                    t2_star_sigma_s=float(1e-6 * sg / g**2),
                    amplitude_sigma=float(fit.theta_sigma[2]))
    try:
        lor = fit_lorentzian(f, c, s, initial=(line.centre_hz, line.fwhm_hz,
                                               float(core(fit.theta, np.array([line.peak]))[0]),
                                               fit.theta[3]))
    except NvmriError as exc:
        warnings.warn(f"{exc}; Lorentzian values are NaN", stacklevel=2)
        nan = float("nan")
        lor = LorentzianFit(nan, nan, nan, nan, nan, nan, nan, nan, nan)
    return lor, line
