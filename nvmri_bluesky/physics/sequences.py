"""What the pulse sequences measure, and the inversions of those signals.

CW ODMR, Rabi, Ramsey, Hahn echo and DEER signals, the optical readout, and
back: the ms=0 population, the DEER contrast, the lock's pair offset.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.physics.constants import DIPOLAR_HZ_NM3, MW_RABI_HZ, MW_REF_POWER_DBM, TAU_CW_S

__all__ = [
    "lorentzian", "odmr_fluorescence", "rabi_flip_probability", "dark_flip_probability",
    "ramsey_p0", "echo_coherence", "dipolar_coupling", "deer_weight", "deer_coherence",
    "p0_from_coherence", "expected_counts", "normalised_population", "deer_contrast",
    "odmr_pair_offset", "rabi_amplitude", "rabi_from_power", "cw_counts",
]

def lorentzian(x: ArrayLike, fwhm: float) -> NDArray:
    """Unit-height Lorentzian of full width ``fwhm`` (same unit as ``x``)."""
    return 1.0 / (1.0 + (2.0 * np.asarray(x, float) / fwhm) ** 2)


def odmr_fluorescence(f_mw: ArrayLike, f_nv: ArrayLike, tau_cw_s: float = TAU_CW_S,
                      contrast_cw: float = 0.15) -> NDArray:
    """CW ODMR: relative fluorescence I/I0 = 1 - C_cw L(f_mw - f_nv), FWHM 1/tau_cw."""
    return 1.0 - contrast_cw * lorentzian(np.subtract(f_mw, f_nv), 1.0 / tau_cw_s)


def rabi_flip_probability(detuning_hz: ArrayLike, rabi_hz: ArrayLike,
                          duration_s: ArrayLike) -> NDArray:
    """Rabi formula: Omega^2/(Omega^2+Delta^2) sin^2(pi t sqrt(Omega^2+Delta^2))."""
    d, om = np.asarray(detuning_hz, float), np.asarray(rabi_hz, float)
    eff = np.hypot(om, d)
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = np.where(eff > 0, om**2 / np.where(eff > 0, eff, 1.0) ** 2, 0.0)
    return amp * np.sin(np.pi * np.asarray(duration_s, float) * eff) ** 2


@lru_cache(maxsize=16)
def _dark_flip_table(t_pi_s: float, t2s_s: float) -> tuple[NDArray, NDArray]:
    """Lorentzian-averaged pi-pulse flip probability, tabulated on a detuning grid."""
    omega, width = 1.0 / (2.0 * t_pi_s), 1.0 / t2s_s
    span = 40.0 * (omega + width)
    delta = np.linspace(-span, span, 8001)
    step = delta[1] - delta[0]
    kernel_x = np.arange(-4000, 4001) * step
    kernel = lorentzian(kernel_x, width)
    kernel /= kernel.sum()
    wide = np.arange(-12000, 12001) * step           # room for the kernel tails
    n = 1 << (wide.size + kernel.size - 2).bit_length()   # >= the full convolution, by FFT
    full = np.fft.irfft(np.fft.rfft(rabi_flip_probability(wide, omega, t_pi_s), n)
                        * np.fft.rfft(kernel, n), n)
    return delta, full[12000:20001]                  # the centre 8001 of the wide grid


def dark_flip_probability(detuning_hz: ArrayLike, t_pi_s: float = 100e-9,
                          t2s_s: float = 150e-9) -> NDArray:
    """RF pi-pulse flip probability of a dark spin, averaged over its ESR line.

    The Rabi formula with Omega = 1/(2 t_pi), convolved with the tip-free
    Lorentzian line of FWHM 1/T2*; evaluated by interpolation in a table.

    Parameters
    ----------
    detuning_hz : array_like
        f_rf - f_dark, Hz.
    """
    delta, p = _dark_flip_table(float(t_pi_s), float(t2s_s))
    return np.interp(detuning_hz, delta, p, left=p[0], right=p[-1])


def ramsey_p0(tau_s: ArrayLike, detuning_hz: ArrayLike, t2s_s: float = 2e-6) -> NDArray:
    """Ramsey population P0 = (1 + exp(-(tau/T2*)^2) cos(2 pi Delta tau))/2."""
    tau = np.asarray(tau_s, float)
    return 0.5 * (1.0 + np.exp(-(tau / t2s_s) ** 2)
                  * np.cos(2 * np.pi * np.asarray(detuning_hz, float) * tau))


def echo_coherence(tau_s: ArrayLike, t2_s: float = 20e-6, exponent: float = 1.5) -> NDArray:
    """Hahn-echo coherence E(tau) = exp(-(tau/T2)^n), tau the total free time."""
    return np.exp(-(np.asarray(tau_s, float) / t2_s) ** exponent)


def dipolar_coupling(offset_nm: ArrayLike, axis: ArrayLike) -> NDArray:
    """Secular NV-spin coupling nu = 52.04 MHz nm^3 (1 - 3 cos^2 theta) / r^3, Hz.

    Parameters
    ----------
    offset_nm : array_like, shape (..., 3)
        Spin position minus NV position, nm.
    axis : array_like, shape (3,)
        Direction of B0, unit vector.
    """
    r = np.asarray(offset_nm, float)
    rn = np.linalg.norm(r, axis=-1)
    cos = (r @ np.asarray(axis, float)) / rn
    return DIPOLAR_HZ_NM3 * (1.0 - 3.0 * cos**2) / rn**3


def deer_weight(nu_hz: ArrayLike, tau_s: ArrayLike) -> NDArray:
    """Coupling weight of a flipped spin in the DEER signal, 1 - cos(pi nu tau)."""
    return 1.0 - np.cos(np.pi * np.asarray(nu_hz, float) * np.asarray(tau_s, float))


def deer_coherence(tau_s: ArrayLike, flip_p: ArrayLike, nu_hz: ArrayLike,
                   t2_s: float = 20e-6, exponent: float = 1.5) -> NDArray:
    """DEER coherence S = E(tau) prod_j [1 - p_j + p_j cos(pi nu_j tau)].

    Parameters
    ----------
    tau_s : array_like, shape (...)
        Total free-evolution time, s.
    flip_p : array_like, shape (..., n_spins)
        RF flip probability of each spin.
    nu_hz : array_like, shape (n_spins,)
        NV-spin couplings, Hz.
    """
    tau = np.asarray(tau_s, float)
    p = np.asarray(flip_p, float)
    factors = 1.0 - p * deer_weight(nu_hz, tau[..., None])
    return echo_coherence(tau, t2_s, exponent) * np.prod(factors, axis=-1)


def p0_from_coherence(coherence: ArrayLike) -> NDArray:
    """NV ms = 0 population after the final pi/2 pulse, (1 + S)/2."""
    return 0.5 * (1.0 + np.asarray(coherence, float))


def expected_counts(p0: ArrayLike, shots: ArrayLike, photons_per_shot: float = 0.03,
                    contrast: float = 0.30) -> NDArray:
    """Mean photon counts of a gate: N (P0 a + (1 - P0) a (1 - C))."""
    p0 = np.asarray(p0, float)
    return np.asarray(shots, float) * photons_per_shot * (1.0 - contrast * (1.0 - p0))


def normalised_population(gate: ArrayLike, bright: ArrayLike, dark: ArrayLike) -> NDArray:
    """Normalised ms = 0 population from counts, P0 = (gate - dark)/(bright - dark)."""
    bright, dark = np.asarray(bright, float), np.asarray(dark, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(gate, float) - dark) / (bright - dark)


def deer_contrast(signal: ArrayLike, echo: ArrayLike, bright: ArrayLike,
                  dark: ArrayLike) -> NDArray:
    """DEER contrast (E - S)/E from the four gates' counts (same shots each).

    S and E are the coherences 2 P0 - 1 of the RF-on (``signal``) and RF-off
    (``echo``) gates, normalised by the bright and dark references.
    """
    s = 2.0 * normalised_population(signal, bright, dark) - 1.0
    e = 2.0 * normalised_population(echo, bright, dark) - 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (e - s) / e


def odmr_pair_offset(dip_minus: ArrayLike, dip_plus: ArrayLike) -> tuple[NDArray, NDArray]:
    """Invert the CW ODMR Lorentzian probed at f_mw -/+ FWHM/2.

    With the fractional dips d = 1 - I/I0 = C L(+/-FWHM/2 - x) on either side,
    x = f_nv - f_mw in units of the FWHM solves
    rho (1 + 2 u^2) = -2 u,  rho = (1/d+ - 1/d-)/(1/d+ + 1/d-),
    and C = (4 + 8 u^2) / (1/d+ + 1/d-).  Valid for |u| < 1/sqrt(2).

    Parameters
    ----------
    dip_minus, dip_plus : array_like
        Fractional dips at f_mw - FWHM/2 and f_mw + FWHM/2.

    Returns
    -------
    (u, contrast) : ndarrays
        Offset f_nv - f_mw in FWHM (nan where outside the capture range) and
        the CW contrast the pair implies.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_m, inv_p = 1.0 / np.asarray(dip_minus, float), 1.0 / np.asarray(dip_plus, float)
        rho = (inv_p - inv_m) / (inv_p + inv_m)
        disc = 1.0 - 2.0 * rho**2
        u = np.where(np.abs(rho) > 1e-12,
                     (-1.0 + np.sqrt(np.where(disc >= 0, disc, np.nan))) / (2.0 * rho),
                     -rho / 2.0)
        contrast = (4.0 + 8.0 * u**2) / (inv_p + inv_m)
    return u, contrast


def rabi_amplitude(detuning_hz: ArrayLike, rabi_hz: ArrayLike) -> NDArray:
    """Off-resonant Rabi amplitude Omega^2 / (Omega^2 + Delta^2), dimensionless.

    The largest population a detuned drive can move; the simulator scales the
    contrast of (nominally ideal) Ramsey and echo pulses by it.
    """
    d, om = np.asarray(detuning_hz, float), np.asarray(rabi_hz, float)
    eff2 = om**2 + d**2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(eff2 > 0, om**2 / np.where(eff2 > 0, eff2, 1.0), 0.0)


def rabi_from_power(power_dbm: ArrayLike, rabi_ref_hz: float = MW_RABI_HZ,
                    power_ref_dbm: float = MW_REF_POWER_DBM) -> NDArray:
    """Rabi frequency of a drive of ``power_dbm``: Omega_ref 10^((P - P_ref)/20), Hz.

    The Rabi frequency is proportional to the drive field amplitude, i.e. to
    the square root of the power; ``rabi_ref_hz`` is reached at
    ``power_ref_dbm``.
    """
    return rabi_ref_hz * 10.0 ** ((np.asarray(power_dbm, float) - power_ref_dbm) / 20.0)


def cw_counts(f_mw: ArrayLike, f_nv: ArrayLike, shots: ArrayLike, window_s: ArrayLike,
              count_rate_hz: float = 100e3, tau_cw_s: float = TAU_CW_S,
              contrast_cw: float = 0.15) -> NDArray:
    """Mean CW-ODMR counts of a gate: shots * count rate * window * I/I0.

    Parameters
    ----------
    f_mw, f_nv : array_like
        Drive and NV transition frequencies, Hz (``f_mw = nan`` or inf: no drive).
    shots : array_like
        Shots per gate.
    window_s : array_like
        Counter window per shot, s.
    """
    drive = np.asarray(f_mw, float)
    fluo = np.where(np.isfinite(drive),
                    odmr_fluorescence(np.where(np.isfinite(drive), drive, 0.0), f_nv,
                                      tau_cw_s, contrast_cw), 1.0)
    return np.asarray(shots, float) * count_rate_hz * np.asarray(window_s, float) * fluo
