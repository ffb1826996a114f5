"""Poisson maximum likelihood by Fisher scoring with Levenberg-Marquardt damping.

Private helper of the reconstruction: photon counts are Poisson, so every
fit of counts minimises the Poisson deviance

    D = 2 sum [y log(y / mu) - (y - mu)]  (+ sum ((theta - m) / s)^2 for priors),

with the Fisher information J^T diag(1/mu) J (+ diag(1/s^2)) as the
Gauss-Newton matrix; its inverse at the optimum is the Cramer-Rao covariance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from nvmri_bluesky import physics

ModelFn = Callable[[NDArray, bool], tuple[NDArray, NDArray | None]]


@dataclass(frozen=True)
class PoissonFit:
    """theta, Fisher matrix, deviance, Pearson chi^2, number of observations."""

    theta: NDArray
    fisher: NDArray
    deviance: float
    pearson: float
    n_obs: int

    @property
    def dof(self) -> int:
        """Observations minus parameters (at least 1)."""
        return max(self.n_obs - self.theta.size, 1)

    @property
    def chi2_reduced(self) -> float:
        """Pearson chi^2 per degree of freedom."""
        return self.pearson / self.dof

    def covariance(self, inflate: bool = True) -> NDArray:
        """Inverse Fisher matrix, times max(1, chi2_reduced) if ``inflate``; all NaN when
        the Fisher matrix is not finite (a model evaluated outside its domain, e.g. a line
        width fitted to 0): the parameters are then not determined."""
        if not np.all(np.isfinite(self.fisher)):
            return np.full(self.fisher.shape, np.nan)
        try:
            cov = np.linalg.inv(self.fisher)
        except np.linalg.LinAlgError:
            cov = np.linalg.pinv(self.fisher)
        return cov * (max(self.chi2_reduced, 1.0) if inflate else 1.0)

    def sigma(self, inflate: bool = True) -> NDArray:
        """One-sigma uncertainties of theta."""
        return np.sqrt(np.clip(np.diag(self.covariance(inflate)), 0.0, None))


def _stats(y: NDArray, mu: NDArray) -> tuple[float, float]:
    mu = np.maximum(mu, 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(y > 0, y * np.log(y / mu), 0.0) - (y - mu)
    return 2.0 * float(term.sum()), float(np.sum((y - mu) ** 2 / mu))


def poisson_ml(fun: ModelFn, y: NDArray, theta0: NDArray, lower: NDArray, upper: NDArray,
               prior_mean: NDArray | None = None, prior_sigma: NDArray | None = None,
               max_iter: int = 200, tol_dev: float = 1e-3, tol_step: float = 1e-3
               ) -> PoissonFit:
    """Maximise the Poisson likelihood of counts ``y`` under ``fun``.

    Parameters
    ----------
    fun : callable
        ``fun(theta, want_jac) -> (mu (n,), jac (n, p) or None)``.
    y : ndarray (n,)
        Observed counts.
    theta0, lower, upper : ndarray (p,)
        Start and box bounds (steps are clipped into the box).
    prior_mean, prior_sigma : ndarray (p,), optional
        Independent Gaussian priors (sigma inf: none).
    max_iter : int
    tol_dev, tol_step : float
        Stop when the deviance drops by less than ``tol_dev`` or no parameter
        moves by more than ``tol_step`` of its current sigma.

    Returns
    -------
    PoissonFit
    """
    y = np.asarray(y, float)
    lo, hi = np.asarray(lower, float), np.asarray(upper, float)
    theta = np.clip(np.asarray(theta0, float), lo, hi)
    p = theta.size
    if prior_sigma is None:
        pinv2 = np.zeros(p)
        pm = np.zeros(p)
    else:
        ps = np.asarray(prior_sigma, float)
        pinv2 = np.where(np.isfinite(ps) & (ps > 0), 1.0 / np.square(np.where(ps > 0, ps, 1.0)),
                         0.0)
        pm = np.asarray(prior_mean, float) if prior_mean is not None else np.zeros(p)

    def full(th: NDArray, want: bool):
        mu, jac = fun(th, want)
        mu = np.maximum(mu, 1e-12)
        dev, pear = _stats(y, mu)
        dev += float(np.sum(pinv2 * (th - pm) ** 2))
        if not want:
            return dev, pear, None, None
        wj = jac / mu[:, None]
        fisher = jac.T @ wj + np.diag(pinv2)
        score = wj.T @ (y - mu) - pinv2 * (th - pm)
        return dev, pear, fisher, score

    dev, pear, fisher, score = full(theta, True)
    lam = 1e-3
    for _ in range(max_iter):
        diag = np.diag(fisher).copy()
        diag[diag <= 0] = 1.0
        accepted = False
        for _ in range(30):
            try:
                step = np.linalg.solve(fisher + lam * np.diag(diag), score)
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            trial = np.clip(theta + step, lo, hi)
            dev_t = full(trial, False)[0]
            if dev_t <= dev:
                accepted = True
                break
            lam *= 4.0
        if not accepted:
            break
        moved = trial - theta
        change = dev - dev_t
        theta = trial
        dev, pear, fisher, score = full(theta, True)
        lam = max(lam / 5.0, 1e-9)
        try:
            sig = np.sqrt(np.abs(np.diag(np.linalg.inv(fisher))))
            rel = float(np.max(np.abs(moved) / np.where(sig > 0, sig, np.inf)))
        except np.linalg.LinAlgError:
            rel = np.inf
        if change < tol_dev or rel < tol_step:
            break
    return PoissonFit(theta=theta, fisher=fisher, deviance=dev, pearson=pear, n_obs=y.size)


def gate_means(shots: NDArray, a: float, contrast_opt: float, echo: NDArray | float,
               c: NDArray) -> tuple[NDArray, NDArray, NDArray, NDArray, NDArray]:
    """Mean counts of the signal, echo, bright, dark gates and their partials.

    Built from ``physics.expected_counts`` and ``physics.p0_from_coherence``:
    RF-on coherence S = E (1 - c), RF-off S = E, bright P0 = 1, dark P0 = 0.
    Both physics functions are affine in each argument used here, so the
    partials are exact secants.

    Parameters
    ----------
    shots : ndarray (P,)
    a, contrast_opt : float
        Photons per shot and optical contrast C.
    echo : float or ndarray (P,)
        Echo coherence E.
    c : ndarray (P,)
        DEER contrast (E - S)/E.

    Returns
    -------
    mu, dmu_da, dmu_dC, dmu_dE : ndarrays (4, P)
    dmu_dc : ndarray (P,)
        Partial of the signal gate's mean with respect to c.
    """
    n = np.asarray(shots, float)
    c = np.asarray(c, float)
    e = np.broadcast_to(np.asarray(echo, float), c.shape)
    p0 = np.stack([physics.p0_from_coherence(e * (1.0 - c)), physics.p0_from_coherence(e),
                   np.ones_like(c), np.zeros_like(c)])
    mu = physics.expected_counts(p0, n, a, contrast_opt)
    dmu_da = physics.expected_counts(p0, n, 1.0, contrast_opt)
    dmu_dc_opt = physics.expected_counts(p0, n, a, 1.0) - physics.expected_counts(p0, n, a, 0.0)
    dmu_dp0 = physics.expected_counts(1.0, n, a, contrast_opt) - physics.expected_counts(
        0.0, n, a, contrast_opt)
    dp0_ds = float(physics.p0_from_coherence(1.0) - physics.p0_from_coherence(0.0))
    dmu_de = np.zeros_like(mu)
    dmu_de[0] = dmu_dp0 * dp0_ds * (1.0 - c)
    dmu_de[1] = dmu_dp0 * dp0_ds
    return mu, dmu_da, dmu_dc_opt, dmu_de, -dmu_dp0 * dp0_ds * e


def initial_nuisance(counts: NDArray, shots: NDArray) -> tuple[float, float, NDArray]:
    """Moment estimates (a, C, E per point) from the reference and echo gates."""
    n = np.asarray(shots, float)
    b = float(np.sum(counts[2]) / np.sum(n))
    d = float(np.sum(counts[3]) / np.sum(n))
    c_opt = float(np.clip(1.0 - d / b, 0.01, 0.99)) if b > 0 else 0.3
    e = (2.0 * counts[1] / n - b - d) / max(b - d, 1e-12)
    return b, c_opt, np.clip(e, 0.02, 1.0)


@dataclass(frozen=True)
class SweepFit:
    """Count-level fit of a sweep: model parameters and nuisances.

    Attributes
    ----------
    theta, theta_sigma : ndarray
        Contrast-model parameters and sigmas (inflated by sqrt(chi2_red) > 1).
    photons_per_shot, optical_contrast : float
    echo : ndarray
        E per point (or one value).
    chi2_reduced : float
    fit : PoissonFit
    """

    theta: NDArray
    theta_sigma: NDArray
    photons_per_shot: float
    optical_contrast: float
    echo: NDArray
    chi2_reduced: float
    fit: PoissonFit


def fit_sweep(counts: NDArray, shots: NDArray, model: Callable[[NDArray], NDArray],
              theta0: NDArray, lower: NDArray, upper: NDArray, fd_step: NDArray,
              echo_per_point: bool) -> SweepFit:
    """Poisson ML of a 1-D sweep's four gates with a parametric contrast model.

    Parameters
    ----------
    counts : ndarray (4, P)
        signal, echo, bright, dark counts.
    shots : ndarray (P,)
    model : callable
        ``model(theta) -> c (P,)``, the DEER contrast at every point.
    theta0, lower, upper : ndarray (q,)
    fd_step : ndarray (q,)
        Central-difference steps for the model's Jacobian.
    echo_per_point : bool
        One echo coherence per point (tau sweeps) or one for all (RF sweeps).

    Returns
    -------
    SweepFit
    """
    counts = np.asarray(counts, float)
    n = np.asarray(shots, float)
    pts = counts.shape[1]
    a0, c0, e0 = initial_nuisance(counts, n)
    n_e = pts if echo_per_point else 1
    e_init = e0 if echo_per_point else np.array([float(np.median(e0))])
    q = len(theta0)
    th0 = np.r_[a0, c0, e_init, theta0]
    lo = np.r_[1e-12, 0.0, np.zeros(n_e), lower]
    hi = np.r_[np.inf, 1.0, np.ones(n_e), upper]

    def fun(th: NDArray, want: bool):
        a, copt, e, tm = th[0], th[1], th[2:2 + n_e], th[2 + n_e:]
        c = model(tm)
        ev = e if echo_per_point else np.full(pts, e[0])
        mu, da, dco, de, dc = gate_means(n, a, copt, ev, c)
        if not want:
            return mu.ravel(), None
        jac = np.zeros((4, pts, th.size))
        jac[:, :, 0], jac[:, :, 1] = da, dco
        if echo_per_point:
            idx = np.arange(pts)
            jac[:, idx, 2 + idx] = de
        else:
            jac[:, :, 2] = de
        for i in range(q):
            up, dn = tm.copy(), tm.copy()
            up[i] += fd_step[i]
            dn[i] -= fd_step[i]
            jac[0, :, 2 + n_e + i] = dc * (model(up) - model(dn)) / (2.0 * fd_step[i])
        return mu.ravel(), jac.reshape(4 * pts, th.size)

    res = poisson_ml(fun, counts.ravel(), th0, lo, hi)
    sig = res.sigma()
    return SweepFit(theta=res.theta[2 + n_e:], theta_sigma=sig[2 + n_e:],
                    photons_per_shot=float(res.theta[0]), optical_contrast=float(res.theta[1]),
                    echo=res.theta[2:2 + n_e], chi2_reduced=res.chi2_reduced, fit=res)
