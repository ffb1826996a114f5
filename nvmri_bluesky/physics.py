"""NV-MRI physics: the one owner of every formula in ``reference/physics.md``.

The simulated IOC and the reconstruction both import this module; nothing else
in the package writes a physics formula.  Every function is pure and
vectorised: array arguments broadcast against each other with numpy's rules.

Units (as in the documents): lengths in nm, fields in tesla, frequencies in
Hz, times in s, magnetic moments in A m^2.

Frame: the diamond surface is z = 0, diamond below (z < 0), the NV at
(0, 0, -depth).  Tip coordinates are those of the apex; the tip is a uniformly
magnetised sphere whose centre sits ``radius`` above the apex.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "MW_RABI_HZ", "MW_REF_POWER_DBM", "TAU_CW_S",
    "GAMMA_E", "D_ZFS", "DIPOLAR_HZ_NM3", "Z_MIN_NM",
    "Instrument", "axis_from_angles", "tip_field", "tip_gradient",
    "nv_transition_frequencies", "nv_frequency", "dark_spin_frequency",
    "field_from_transitions", "lorentzian", "odmr_fluorescence", "rabi_flip_probability",
    "dark_flip_probability", "ramsey_p0", "echo_coherence",
    "dipolar_coupling", "deer_coherence", "deer_weight", "p0_from_coherence",
    "expected_counts", "spatial_width", "dark_spin_psf",
    "rabi_amplitude", "rabi_from_power", "cw_counts", "apex_with_drift",
    "dark_spin_frequency_from_transitions", "couplings_from_weight",
    "gradient_from_spatial_width", "classical_deer_factor", "quantum_snr_gain",
    "rms_coupling", "minus_transition_signs",
]

GAMMA_E = 28.025e9
"""Electron gyromagnetic ratio for g = 2, Hz/T (2.8025 MHz/G)."""
D_ZFS = 2.870e9
"""NV ground-state zero-field splitting, Hz."""
DIPOLAR_HZ_NM3 = 52.04e6
"""mu0 h gamma_e^2 / (4 pi), Hz nm^3."""
Z_MIN_NM = 5.0
"""Default lowest apex height above the surface, nm (below it: a crash)."""
MU0_OVER_4PI = 1e-7
"""T m / A."""
MW_RABI_HZ = 20e6
"""NV Rabi frequency at the default MW power, Hz (pi pulse 25 ns): the simulated
instrument's drive, and the default of the pulse builders' pulse lengths."""
MW_REF_POWER_DBM = 0.0
"""MW power at which the NV Rabi frequency is :data:`MW_RABI_HZ`, dBm."""
TAU_CW_S = 120e-9
"""Default CW probe inverse linewidth (FWHM = 1/tau_cw = 8.3 MHz), s."""


@dataclass(frozen=True)
class Instrument:
    """Defaults of ``physics.md``: the sensor, the tip and the dark-spin bath.

    Every attribute is in the unit its name gives.  Scenario files override
    these; the simulator and the analysis both start from them.
    """

    b0_tesla: float = 0.12
    nv_depth_nm: float = 10.0
    nv_axis_deg: tuple[float, float] = (54.74, 0.0)
    nv_t2_star_s: float = 2e-6
    nv_t2_s: float = 20e-6
    nv_t2_exponent: float = 1.5
    photons_per_shot: float = 0.03
    contrast: float = 0.30
    tau_cw_s: float = TAU_CW_S
    contrast_cw: float = 0.15
    cw_count_rate_hz: float = 100e3
    tip_radius_nm: float = 30.0
    tip_moment_am2: float = 4.3e-17
    dark_t2_star_s: float = 150e-9
    rf_pi_s: float = 100e-9
    z_min_nm: float = Z_MIN_NM
    nv_axis: NDArray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nv_axis", axis_from_angles(*self.nv_axis_deg))

    @property
    def nv_position_nm(self) -> NDArray:
        """NV position in the lab frame, shape (3,), nm."""
        return np.array([0.0, 0.0, -self.nv_depth_nm])

    @property
    def b0_vector(self) -> NDArray:
        """Bias field along the NV axis, shape (3,), T."""
        return self.b0_tesla * self.nv_axis

    def field_at(self, points_nm: ArrayLike, apex_nm: ArrayLike) -> NDArray:
        """Total field (bias + tip) at ``points_nm`` with the apex at ``apex_nm``, T."""
        return self.b0_vector + tip_field(points_nm, apex_nm, self.tip_radius_nm,
                                          self.tip_moment_am2)

    def f_nv(self, apex_nm: ArrayLike) -> NDArray:
        """NV ms=0 -> +1 frequency with the apex at ``apex_nm`` (..., 3), Hz."""
        return nv_frequency(self.field_at(self.nv_position_nm, apex_nm), self.nv_axis)

    @property
    def f_nv0(self) -> float:
        """NV ms=0 -> +1 frequency with the tip far away, Hz."""
        return float(nv_frequency(self.b0_vector, self.nv_axis))

    @property
    def f_dark0(self) -> float:
        """Dark-spin resonance with the tip far away, Hz."""
        return float(dark_spin_frequency(self.b0_vector))


def axis_from_angles(polar_deg: float, azimuth_deg: float) -> NDArray:
    """Unit vector from a polar angle (from +z) and an azimuth, degrees -> (3,)."""
    th, ph = np.deg2rad(polar_deg), np.deg2rad(azimuth_deg)
    return np.array([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)])


def _tip_offset_m(points_nm: ArrayLike, apex_nm: ArrayLike, radius_nm: float) -> NDArray:
    centre = np.asarray(apex_nm, float) + np.array([0.0, 0.0, radius_nm])
    return (np.asarray(points_nm, float) - centre) * 1e-9


def tip_field(points_nm: ArrayLike, apex_nm: ArrayLike, radius_nm: float = 30.0,
              moment_am2: float = 4.3e-17) -> NDArray:
    """Field of the magnetised-sphere tip (moment along +z), outside the sphere.

    Parameters
    ----------
    points_nm : array_like, shape (..., 3)
        Where the field is wanted, nm.
    apex_nm : array_like, shape (..., 3)
        Tip apex positions, nm; broadcast against ``points_nm``.
    radius_nm : float
        Sphere radius; its centre is ``radius_nm`` above the apex.
    moment_am2 : float
        Magnetic moment, A m^2.

    Returns
    -------
    ndarray, shape (..., 3)
        Point-dipole field B = 1e-7 (3 r^(m.r^) - m) / |r|^3, T.
    """
    r = _tip_offset_m(points_nm, apex_nm, radius_nm)
    r2 = np.einsum("...i,...i->...", r, r)
    k = MU0_OVER_4PI * moment_am2 / (r2 * np.sqrt(r2))          # mu0 m / (4 pi r^3)
    b = (3.0 * k * r[..., 2] / r2)[..., None] * r               # 3 r (m . r) / r^2 term
    b[..., 2] -= k
    return b


def tip_gradient(points_nm: ArrayLike, apex_nm: ArrayLike, axis: ArrayLike,
                 radius_nm: float = 30.0, moment_am2: float = 4.3e-17) -> NDArray:
    """Gradient of the tip field's component along ``axis``, d(B_tip . n)/dr.

    The gradient with respect to the tip position is the negative of this;
    magnitudes (what resolution depends on) are the same.

    Returns
    -------
    ndarray, shape (..., 3)
        T/nm.
    """
    r = _tip_offset_m(points_nm, apex_nm, radius_nm)
    n = np.asarray(axis, float)
    m = np.array([0.0, 0.0, moment_am2])
    rn = np.linalg.norm(r, axis=-1, keepdims=True)
    mr, nr, mn = (r @ m)[..., None], (r @ n)[..., None], float(m @ n)
    grad = 3 * (m * nr + n * mr + mn * r) / rn**5 - 15 * mr * nr * r / rn**7
    return MU0_OVER_4PI * grad * 1e-9


_SX = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]]) / np.sqrt(2)
_SZ = np.diag([1.0, 0.0, -1.0])


def nv_transition_frequencies(b_tesla: ArrayLike, axis: ArrayLike,
                              d_hz: float = D_ZFS) -> tuple[NDArray, NDArray]:
    """Exact NV transition frequencies from the spin-1 Hamiltonian.

    H/h = D Sz'^2 + gamma_e B . S with z' along ``axis``; the eigenstates are
    labelled by their largest overlap with |ms>.

    Parameters
    ----------
    b_tesla : array_like, shape (..., 3)
        Total field at the NV, T.
    axis : array_like, shape (3,)
        NV axis, unit vector.

    Returns
    -------
    (f_plus, f_minus) : ndarrays, shape (...)
        ms = 0 -> +1 and ms = 0 -> -1 frequencies, Hz (signed: f_minus is
        negative above the ground-state level anticrossing).
    """
    b = np.asarray(b_tesla, float)
    n = np.asarray(axis, float)
    bz = b @ n
    bx = np.linalg.norm(b - bz[..., None] * n, axis=-1)
    h = (d_hz * _SZ @ _SZ + GAMMA_E * (bz[..., None, None] * _SZ
                                        + bx[..., None, None] * _SX))
    energies, states = np.linalg.eigh(h)
    weight = states**2                      # (..., basis ms=+1,0,-1, eigenstate)
    label = np.argmax(weight, axis=-1)      # eigenstate with most |ms> character
    e = np.take_along_axis(energies, label, axis=-1)
    return e[..., 0] - e[..., 1], e[..., 2] - e[..., 1]


def nv_frequency(b_tesla: ArrayLike, axis: ArrayLike) -> NDArray:
    """NV ms = 0 -> +1 transition frequency (the one the package drives), Hz."""
    return nv_transition_frequencies(b_tesla, axis)[0]


def field_from_transitions(f_plus_hz: ArrayLike, f_minus_hz: ArrayLike,
                           d_hz: float = D_ZFS) -> tuple[NDArray, NDArray]:
    """Invert the NV Hamiltonian: both transition frequencies -> the field.

    The eigenvalues E of H/h (basis +1, 0, -1; b = gamma B_par, c = gamma B_perp)
    satisfy E b^2 - (D - E) c^2 = E (D - E)^2, and they sum to 2D, so the two
    measured transitions give E_0 and E_+ and a linear system for b^2, c^2.

    Parameters
    ----------
    f_plus_hz, f_minus_hz : array_like, same shape
        Signed ms = 0 -> +1 and ms = 0 -> -1 frequencies, as returned by
        :func:`nv_transition_frequencies`, Hz.

    Returns
    -------
    (b_par, b_perp) : ndarrays, T
        Field along the NV axis (signed) and its magnitude across it.
    """
    fp, fm = np.asarray(f_plus_hz, float), np.asarray(f_minus_hz, float)
    e0 = (2.0 * d_hz - fp - fm) / 3.0
    ep = e0 + fp
    # [e0, -(D - e0)] [b2, c2]^T = e0 (D - e0)^2 ; same with ep
    a11, a12, r1 = e0, -(d_hz - e0), e0 * (d_hz - e0) ** 2
    a21, a22, r2 = ep, -(d_hz - ep), ep * (d_hz - ep) ** 2
    det = a11 * a22 - a12 * a21
    b2 = (r1 * a22 - a12 * r2) / det
    c2 = (a11 * r2 - a21 * r1) / det
    b_par = np.sign(fp - fm) * np.sqrt(np.clip(b2, 0.0, None)) / GAMMA_E
    return b_par, np.sqrt(np.clip(c2, 0.0, None)) / GAMMA_E


def dark_spin_frequency(b_tesla: ArrayLike) -> NDArray:
    """Resonance of a g = 2, S = 1/2 dark spin, gamma_e |B|, Hz. Shape (...)."""
    b = np.asarray(b_tesla, float)
    return GAMMA_E * np.sqrt(np.einsum("...i,...i->...", b, b))


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


def apex_with_drift(stage_nm: ArrayLike, drift_nm_per_s: ArrayLike, time_s: ArrayLike
                    ) -> NDArray:
    """True tip apex: stage readback plus a linear drift, stage + v t, nm. Shape (..., 3)."""
    return (np.asarray(stage_nm, float)
            + np.asarray(drift_nm_per_s, float) * np.asarray(time_s, float)[..., None])


def minus_transition_signs(f_plus_hz: ArrayLike, f_minus_abs_hz: ArrayLike,
                           d_hz: float = D_ZFS) -> NDArray:
    """Signs of the ms=0->-1 frequencies along a path a lock followed, from continuity.

    A lock measures |f-|; the sign (negative above the level anticrossing)
    does not follow from f+ once the tip's field across the NV axis bends
    both lines: f+ < 2D with f- < 0 occurs (e.g. f+ = 5.68 GHz, f- = -1.12 GHz
    with 26 mT across the axis), and both signs then invert to a consistent
    field (:func:`field_from_transitions`; there B_par = 112 or 86 mT).  The
    rule "f- < 0 where f+ > 2D" holds where the transverse field is weak, so
    it fixes the sign at the path's point of weakest transverse field; from
    there B_par is continuous along the path both ways, and each point takes
    the sign whose B_par is nearer its neighbour's.

    Parameters
    ----------
    f_plus_hz, f_minus_abs_hz : array_like, shape (n,)
        The ms=0->+1 frequency and |ms=0->-1 frequency| at each point, in the
        order the lock went (NaN: not locked; skipped), Hz.

    Returns
    -------
    ndarray, shape (n,)
        +1 or -1 per point.
    """
    fp = np.asarray(f_plus_hz, float)
    fm = np.abs(np.asarray(f_minus_abs_hz, float))
    rule = np.where(fp > 2 * d_hz, -1.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        (par_p, perp_p), (par_m, perp_m) = (field_from_transitions(fp, fm, d_hz),
                                            field_from_transitions(fp, -fm, d_hz))
    par = np.stack([par_p, par_m])                                  # (sign +, sign -)
    perp_rule = np.where(rule > 0, perp_p, perp_m)
    if not np.isfinite(perp_rule).any():
        return rule
    anchor = int(np.nanargmin(perp_rule))
    signs = rule.copy()
    for path in (range(anchor + 1, fp.size), range(anchor - 1, -1, -1)):
        previous = float(par[0 if rule[anchor] > 0 else 1, anchor])
        for i in path:
            if not np.all(np.isfinite(par[:, i])):
                continue
            k = int(np.argmin(np.abs(par[:, i] - previous)))
            signs[i], previous = (1.0, -1.0)[k], float(par[k, i])
    return signs


def dark_spin_frequency_from_transitions(f_plus_hz: ArrayLike, f_minus_hz: ArrayLike,
                                         d_hz: float = D_ZFS) -> NDArray:
    """Dark-spin resonance gamma_e |B| from the two measured NV transitions, Hz.

    |B| = sqrt(B_par^2 + B_perp^2) from :func:`field_from_transitions` (exact
    inversion of the NV Hamiltonian), then :func:`dark_spin_frequency`.  This is
    what a g = 2 dark spin at the NV's place would resonate at; near the level
    anticrossing it differs from the ms=0->+1 shift whenever B has a component
    across the NV axis.

    Parameters
    ----------
    f_plus_hz, f_minus_hz : array_like, same shape
        Signed ms=0->+1 and ms=0->-1 frequencies (as
        :func:`nv_transition_frequencies` returns them), Hz.

    Returns
    -------
    ndarray, same shape, Hz.
    """
    b_par, b_perp = field_from_transitions(f_plus_hz, f_minus_hz, d_hz)
    return dark_spin_frequency(np.stack([b_perp, np.zeros_like(b_perp), b_par], axis=-1))


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
