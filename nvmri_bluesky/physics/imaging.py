"""From signals to images: slice width, point-spread function, couplings, SNR gain.

The dark-spin point-spread function from a measured detuning map, the
gradient a slice width implies, couplings from a DEER weight, and the
quantum-over-classical DEER SNR gain of Fig. 4.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.physics.constants import GAMMA_E
from nvmri_bluesky.physics.sequences import dark_flip_probability, deer_weight, echo_coherence

__all__ = [
    "spatial_width", "dark_spin_psf", "couplings_from_weight", "gradient_from_spatial_width",
    "classical_deer_factor", "quantum_snr_gain", "rms_coupling",
]

def spatial_width(tau_s: ArrayLike, gradient_t_per_nm: ArrayLike) -> NDArray:
    """Spatial period or slice width 1/(gamma_e tau |grad B|), nm.

    The Ramsey fringe period for a free time ``tau`` and the FWHM of a
    resonant slice of inverse linewidth ``tau`` are both this.
    """
    return 1.0 / (GAMMA_E * np.asarray(tau_s, float) * np.abs(gradient_t_per_nm))


def dark_spin_psf(detuning_map_hz: ArrayLike, rf_offset_hz: float,
                  t_pi_s: float = 100e-9, t2s_s: float = 150e-9) -> NDArray:
    """Dark-spin point-spread function from a measured NV detuning map.

    PSF(t) = p(f_rf - f_dark0 - Delta f(t)), with Delta f(t) the NV detuning
    measured with the tip at t (g = 2 for both, so Delta f_dark = Delta f_nv
    for fields along the NV axis) and p the tip-free flip probability.

    Parameters
    ----------
    detuning_map_hz : array_like, any shape
        f_nv(tip) - f_nv(tip far away), Hz.
    rf_offset_hz : float
        f_rf - f_dark0, Hz.
    """
    return dark_flip_probability(rf_offset_hz - np.asarray(detuning_map_hz, float),
                                 t_pi_s, t2s_s)


def couplings_from_weight(weight: ArrayLike, tau_s: float, branches: int = 8) -> NDArray:
    """All non-negative couplings |nu| with deer_weight(nu, tau) = weight, Hz.

    Inverts w = 1 - cos(pi nu tau): pi |nu| tau = 2 pi k +/- arccos(1 - w).

    Parameters
    ----------
    weight : array_like, shape (...)
        DEER weights in [0, 2] (clipped).
    tau_s : float
        Free-evolution time, s.
    branches : int
        Number of k = 0, 1, ... to return.

    Returns
    -------
    ndarray, shape (..., 2 * branches)
        Sorted ascending along the last axis, Hz.
    """
    a = np.arccos(1.0 - np.clip(np.asarray(weight, float), 0.0, 2.0))[..., None]
    k = 2.0 * np.pi * np.arange(branches)
    cand = np.concatenate([k + a, k + 2.0 * np.pi - a], axis=-1) / (np.pi * tau_s)
    return np.sort(cand, axis=-1)


def gradient_from_spatial_width(tau_s: ArrayLike, width_nm: ArrayLike) -> NDArray:
    """Field gradient implied by a fringe period or slice width, 1/(gamma_e tau w), T/nm.

    The inverse of :func:`spatial_width`: a Ramsey fringe period ``width_nm``
    at free time ``tau_s`` (or a resonant slice of FWHM ``width_nm`` for an
    inverse linewidth ``tau_s``) means |grad| = 1/(gamma_e tau w).
    """
    return 1.0 / (GAMMA_E * np.asarray(tau_s, float) * np.asarray(width_nm, float))


def classical_deer_factor(nu_hz: ArrayLike, tau_s: ArrayLike) -> NDArray:
    """DEER factor of a classical moment of random orientation, <cos(pi nu tau cos a)>.

    Averaged over an isotropic direction (cos a uniform on [-1, 1]) it is
    sin(x)/x with x = pi nu tau (``np.sinc(nu tau)``): it decays instead of
    oscillating like a quantum spin-1/2's cos(pi nu tau) (physics.md, DEER).
    """
    return np.sinc(np.asarray(nu_hz, float) * np.asarray(tau_s, float))


def quantum_snr_gain(nu_hz: float, t2_s: float = 20e-6, exponent: float = 1.5,
                     tau_min_s: float = 0.0, tau_max_s: float = 30e-6,
                     num: int = 6001) -> float:
    """SNR gain of a quantum spin-1/2's DEER signal over a classical random moment.

    Signal: the drop of the NV coherence the flipped spin causes,
    E(tau) (1 - cos(pi nu tau)) for the quantum spin and
    E(tau) (1 - sin(x)/x) for the classical moment (:func:`classical_deer_factor`),
    each at its own best free time in [tau_min, tau_max] (the flip probability
    multiplies both and cancels).  Noise: the photon shot noise of the same
    shots, the same for both.  The gain is the ratio of the two best signals.

    Parameters
    ----------
    nu_hz : float
        NV-spin coupling, Hz.
    t2_s, exponent : float
        Echo decay E(tau) = exp(-(tau/T2)^n).
    tau_min_s, tau_max_s : float
        Free times allowed, s.
    num : int
        Grid points in tau.

    Returns
    -------
    float
    """
    taus = np.linspace(max(tau_min_s, 1e-12), tau_max_s, num)
    e = echo_coherence(taus, t2_s, exponent)
    quantum = np.max(e * deer_weight(nu_hz, taus))
    classical = np.max(e * (1.0 - classical_deer_factor(nu_hz, taus)))
    return float(quantum / classical)


def rms_coupling(nu_hz: ArrayLike, weight: ArrayLike = 1.0) -> float:
    """Root-sum-square coupling of a bath, sqrt(sum_j w_j nu_j^2), Hz.

    For a layer of density n (spins per nm^2) sampled by a quadrature of areas
    A_j: w_j = n A_j.  It sets the bath's short-time DEER decay:
    sum_j (1 - cos(pi nu_j tau)) -> (pi tau nu_rms)^2 / 2.
    """
    nu = np.asarray(nu_hz, float)
    return float(np.sqrt(np.sum(np.asarray(weight, float) * nu**2)))
