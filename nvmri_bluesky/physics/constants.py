"""Physical constants and the simulated instrument's model constants."""

from __future__ import annotations

__all__ = [
    "GAMMA_E", "D_ZFS", "DIPOLAR_HZ_NM3", "Z_MIN_NM", "MU0_OVER_4PI", "MW_RABI_HZ",
    "MW_REF_POWER_DBM", "TAU_CW_S",
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
