"""The dark-spin point-spread function from measured maps: no tip model anywhere.

Pieces (all from measurements):

1. **Dark-frequency map** (:mod:`.detuning`).  A ``psf_map`` run locks both NV
   transitions at every tip position t.
   :func:`physics.dark_spin_frequency_from_transitions` turns (f+, f-) into
   gamma_e |B| exactly (B0 = 0.12 T sits just above the ground-state level
   anticrossing, so the ms=0->+1 shift alone would be off by tens of MHz
   wherever the tip field has a component across the NV axis).  The map is
   referenced to the retracted-tip pair ``f_nv0_hz``, ``f_minus0_hz``:
   Delta f_dark(t) = gamma|B|(t) - gamma|B|(far), so a miscalibrated
   zero-field splitting D cancels to first order.
   (:func:`~.detuning.dark_detuning_map`, :class:`~.detuning.DetuningInterpolant`.)
2. **Dark-spin line** (:mod:`.lines`).  A tip-free ``deer_spectrum`` (RF sweep)
   fitted with a Lorentzian (:func:`~.lines.fit_lorentzian`: centre f_dark0,
   FWHM, amplitude) and with the pi-pulse flip-probability model of
   physics.md, ``physics.dark_flip_probability`` with the known RF pulse
   length and the dark-spin T2* free (:func:`~.lines.fit_flip_line` ->
   :class:`~.lines.FlipLine`).  The flip model's T2* is what the PSF uses
   ("the measured line width").
3. **PSF** (this module).  PSF(t) = p(f_rf - f_dark0 - Delta f_dark(t))
   (:class:`DarkSpinPSF`), evaluated anywhere inside the PSF map's box by a
   cubic tensor B-spline (``scipy.ndimage`` spline filter +
   ``map_coordinates``), with spline gradients.

Outside the PSF map's box the interpolant returns NaN (never extrapolates):
callers either restrict offsets to where t - r' stays inside (the
localisation does, see :func:`feasible_offset_box`) or treat NaN as "no
information".  Gaps (NaN locks) inside the map are filled from the nearest
valid point before the spline is built, if they are at most 5 % of the map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant
from nvmri_bluesky.reconstruct.lines import FlipLine

__all__ = ["DarkSpinPSF", "feasible_offset_box"]


@dataclass(frozen=True)
class DarkSpinPSF:
    """PSF(t) = p(f_rf - f_dark0 - Delta f_dark(t)) for one RF frequency.

    Attributes
    ----------
    detuning : DetuningInterpolant
        Measured Delta f_dark map.
    line : FlipLine
        Tip-free line: centre f_dark0, T2*, RF pi-pulse length.
    rf_frequency_hz : float
        RF carrier of the DEER raster, Hz.
    """

    detuning: DetuningInterpolant
    line: FlipLine
    rf_frequency_hz: float

    @property
    def rf_offset_hz(self) -> float:
        """f_rf - f_dark0, Hz: which Delta f_dark contour is resonant."""
        return float(self.rf_frequency_hz - self.line.centre_hz)

    def __call__(self, points: ArrayLike) -> NDArray:
        """PSF at tip positions ``points`` (..., 3) nm; NaN outside the PSF map."""
        return self.of_detuning(self.detuning(points))

    def of_detuning(self, detuning_hz: ArrayLike) -> NDArray:
        """PSF where the map gives Delta f_dark = ``detuning_hz`` (any shape, Hz)."""
        return self.line.probability(self.rf_offset_hz - np.asarray(detuning_hz, float))

    def value_and_gradient(self, points: ArrayLike) -> tuple[NDArray, NDArray]:
        """PSF (...) and dPSF/dt (..., 3) in 1/nm at ``points`` (..., 3)."""
        f, grad = self.detuning.value_and_gradient(points)
        det = self.rf_offset_hz - f
        v = self.line.probability(det)
        g = -self.line.derivative(det)[..., None] * grad
        return v, g

    def at_offset(self, tips: ArrayLike, offset: ArrayLike) -> NDArray:
        """Signal pattern of a spin at ``offset`` r' (3,) seen from ``tips`` (..., 3)."""
        return self(np.asarray(tips, float) - np.asarray(offset, float))

    def slice_widths(self, points: ArrayLike) -> tuple[NDArray, NDArray]:
        """Lateral and vertical FWHM of the resonant slice at ``points``, nm.

        FWHM_f / |grad_xy Delta f_dark| and FWHM_f / |d Delta f_dark / dz|,
        FWHM_f the width of the measured flip line (physics.md's
        1/(tau_eff gamma |grad B|) with 1/tau_eff -> the measured line FWHM).
        """
        g = self.detuning.gradient(points)
        fw = self.line.fwhm_hz
        with np.errstate(divide="ignore"):
            return fw / np.hypot(g[..., 0], g[..., 1]), fw / np.abs(g[..., 2])


def feasible_offset_box(tips: ArrayLike, detuning: DetuningInterpolant,
                        prior: ArrayLike | None = None) -> NDArray:
    """Offsets r' for which every t - r' (t in ``tips``) lies inside the PSF map.

    Parameters
    ----------
    tips : array_like, (..., 3)
        Tip positions of the raster(s), nm.
    detuning : DetuningInterpolant
    prior : array_like, (3, 2), optional
        Prior box [[dx_lo, dx_hi], [dy_lo, dy_hi], [dz_lo, dz_hi]] to intersect.

    Returns
    -------
    ndarray, (3, 2)
        [lo, hi] per axis; lo > hi on an axis means no offset is fully covered.
    """
    t = np.asarray(tips, float).reshape(-1, 3)
    b = detuning.bounds
    lo = t.max(axis=0) - b[:, 1]
    hi = t.min(axis=0) - b[:, 0]
    box = np.stack([lo, hi], axis=-1)
    if prior is not None:
        pr = np.asarray(prior, float)
        box = np.stack([np.maximum(box[:, 0], pr[:, 0]), np.minimum(box[:, 1], pr[:, 1])], -1)
    return box
