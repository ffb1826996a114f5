"""Resonance frequencies: the NV ground-state Hamiltonian and the dark spins.

Both NV transitions from the field, the field (and the dark-spin line) back
from both transitions, and the sign of the ms=0->-1 transition along a path.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.physics.constants import D_ZFS, GAMMA_E

__all__ = [
    "nv_transition_frequencies", "nv_frequency", "field_from_transitions",
    "dark_spin_frequency", "minus_transition_signs", "dark_spin_frequency_from_transitions",
]

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
