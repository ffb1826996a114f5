"""The measurement protocol the reconstruction is designed for (numbers and designers).

The plans must measure this way for the reconstruction's accuracy claims to
hold; ``docs/reconstruction.md`` explains the choices.  Everything here is a
pure function of *measured* data (the PSF map, the dark-spin line, the
tip-free coupling), so a plan can call it between runs.

Single spins (Fig. 4)
---------------------
1. ``psf_map`` (lock both transitions): :data:`SPIN_PSF_MAP` grid.
2. ``deer_evolution`` (tip retracted, RF on the line predicted from the
   retracted-tip NV transitions): :data:`EVOLUTION_TAUS_S` -> |nu|
   (:func:`~.localize.fit_deer_evolution`), then :func:`choose_tau`.
3. ``deer_spectrum`` (tip retracted) at that tau: RF over the predicted
   line +/- 40 MHz, 81 points, :data:`SPECTRUM_SHOTS` shots -> f_dark0, T2*.
4. ``deer_raster``: one plane at apex height :data:`SPIN_PLANE_NM`, RF offset
   and window from :func:`design_spin_raster` (ring of a spin at the top of
   the prior box still >= 6 nm in radius; window = the largest ring plus the
   lateral prior box plus 2 nm), lateral step :data:`SPIN_STEP_NM`,
   :data:`SPIN_SHOTS` shots per gate and point.

Layers (Fig. 3)
---------------
:data:`LAYER_PSF_MAP`, then ``deer_raster`` planes :data:`LAYER_PLANES_NM`
with :func:`design_layer_raster` (RF offset: dome top 4 nm below the lowest
plane), step :data:`LAYER_STEP_NM`, tau :data:`LAYER_TAU_S`; plus a
tip-free ``deer_evolution`` at :data:`LAYER_EVOLUTION_TAUS_S`.

Where a locked raster's lock can follow the measured line (for designers
lowering a raster): :mod:`.lockable`.  The Fig. 2 calibration's design:
:mod:`.calibration_design`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant

__all__ = [
    "SAME_SPIN_NM", "SEARCH_MARGIN_NM", "SEARCH_DZ_NM", "SPIN_PSF_MAP", "SPIN_PLANE_NM",
    "SPIN_TOP_MARGIN_NM", "SPIN_STEP_NM",
    "SPIN_SHOTS",
    "SPIN_SURVEY_STEP_NM", "SPIN_FINE_PLANES_NM", "design_fine_raster",
    "SPIN_ZOOM_LATERAL_NM", "SPIN_ZOOM_VERTICAL_NM", "SPIN_ZOOM_STEP_NM", "SPIN_ZOOM_POINTS",
    "SPIN_ZOOM_RING_FRACTION", "design_zoom_raster",
    "SPECTRUM_SHOTS", "SPECTRUM_SPAN_HZ", "SPECTRUM_POINTS", "EVOLUTION_TAUS_S",
    "EVOLUTION_MAX_SHOT_FACTOR",
    "LAYER_PSF_MAP", "LAYER_PLANES_NM", "LAYER_STEP_NM", "LAYER_TAU_S", "LAYER_SHOTS",
    "LAYER_EVOLUTION_TAUS_S", "LAYER_EVOLUTION_SHOTS", "RasterDesign", "design_spin_raster",
    "design_layer_raster", "choose_tau", "axis_spec",
]

PRIOR_LATERAL_NM = 8.0
PRIOR_DZ_NM = (-6.0, 2.0)
"""The envelope of spin offsets the protocol images (issue #11): |dx|, |dy| and dz, nm."""
SEARCH_MARGIN_NM = 0.5
"""The fit searches the envelope grown by this on every side (``localize.PRIOR_BOX``),
nm.  A spin on the envelope's edge is then not pushed onto the search box's bound by
noise, where it would be rejected as an object outside the searched volume (a 77 kHz
spin at dz = -5.99 nm under a 14.9 nm NV ended at -6.0 in 1 of 10 noise draws);
0.5 nm is > 10 sigma of any survey fit."""
SEARCH_DZ_NM = (PRIOR_DZ_NM[0] - SEARCH_MARGIN_NM, PRIOR_DZ_NM[1] + SEARCH_MARGIN_NM)
SAME_SPIN_NM = 1.0
"""Offsets closer than this are one spin: a weaker class's survey and the merge of the
classes' fits (``analysis.spins._merge_spins``) both count them once, nm."""
PRIOR_MIN_COUPLING_HZ = 50e3
"""Weakest coupling of the spins searched (issue #11's envelope), Hz.  A fit weaker than
this is outside the prior, like one on the box's bound: under a layer, its strongest
spins (up to ~2 x 52 MHz nm^3 / h^3, 70 kHz at 11 nm) image like a weak spin near
the box's top (seed 1103 of test_demo: 38 kHz at dz = 1.8 nm in the 8.3 us survey)."""

SPIN_PSF_MAP = {"x": (-32.0, 68.0, 11), "y": (-50.0, 50.0, 11), "z": (15.0, 40.0, 6)}
"""PSF map for single spins: (start, stop, num) per axis, nm (10 nm lateral, 5 nm vertical).

Its two lowest planes (15, 20 nm) are there for the zoom raster
(:func:`design_zoom_raster`), which images the spin where the gradient is
steep enough for the paper's resolution.

The tip field varies on the scale of the apex-NV distance (> 60 nm from the
sphere's centre), so the cubic spline through this grid reproduces the exact
detuning to ~5 pm rms in position (tests/test_reconstruct_psf.py) over the
region the spin fit uses; on 12 synthetic spins the offsets' errors / sigma
are the same as with an 8 nm / 5 nm or a 4 nm / 3 nm grid
(docs/reconstruction.md)."""
SPIN_PLANE_NM = 30.0
"""Apex height of the single-spin DEER plane, nm."""
SPIN_TOP_MARGIN_NM = 7.5
"""The resonant dome's top sits this far above the DEER plane, nm (dz = -6 spins still ring)."""
SPIN_STEP_NM = 2.5
"""Lateral step of the fine single-spin DEER raster, nm."""
SPIN_SURVEY_STEP_NM = 4.0
"""Lateral step of the survey DEER raster that finds the spins (its ring is
~1-2 nm thick and 12-50 nm across: a 4 nm lattice crosses it many times), nm."""
SPIN_FINE_PLANES_NM = (0.0, 2.0)
"""Planes of the fine raster, nm above :data:`SPIN_PLANE_NM`."""
"""Lateral step of the single-spin DEER raster, nm."""
SPIN_ZOOM_LATERAL_NM = 0.6
"""The zoom raster's plane is the highest one whose predicted lateral slice width at the
spin's ring is at most this (the paper: 0.8 +/- 0.4 nm), nm."""
SPIN_ZOOM_VERTICAL_NM = 1.0
"""... and whose predicted vertical slice width is at most this (the paper: 1.5 nm), nm."""
SPIN_ZOOM_STEP_NM = 0.3
"""Step of the zoom raster (about half the slice width it resolves), nm."""
SPIN_ZOOM_POINTS = 13
"""Points per lateral axis of the zoom raster (a 3.6 nm square across the ring)."""
SPIN_ZOOM_RING_FRACTION = 0.6
"""The zoom raster's RF offset, as a fraction of the largest Delta f_dark the spin sees
on its plane: the ring then lies on the dome's steep flank (lateral and vertical
gradients both large; near the dome's top the lateral one vanishes)."""
SPIN_SHOTS = 200_000
"""Shots per gate and point, single-spin raster."""
SPECTRUM_SHOTS = 200_000
SPECTRUM_SPAN_HZ = 40e6
SPECTRUM_POINTS = 81
EVOLUTION_TAUS_S = tuple(np.round(np.r_[np.linspace(0.25e-6, 2.0e-6, 36),
                                          np.linspace(2.5e-6, 30e-6, 40)], 9))
"""Tip-free evolution: 50 ns steps to 2 us (|nu| up to 20 MHz unaliased), then 0.7 us steps."""
EVOLUTION_MAX_SHOT_FACTOR = 4
"""The tip-free evolution is repeated (its counts summed) up to this many times in all when
couplings below the classes it found are not excluded beside them
(``crosscheck.evolution_shot_factor``): a weak spin beside strong ones.  One repeat costs
~0.75 h of instrument time (seed 25 of ``nvmri validate``: 2680 s), a weak class's survey
~8 h; beyond this factor the survey is the cheaper way to look."""

LAYER_PSF_MAP = {"x": (-60.0, 96.0, 14), "y": (-78.0, 78.0, 14), "z": (9.0, 33.0, 4)}
"""PSF map for layers (covers the layer plane's reach): (start, stop, num), nm.

12 nm lateral, 8 nm vertical steps (784 points): the spline's position error
is 7 pm median, 67 pm at the 99th percentile (near the tip), against a 1 nm
target for the layer height, which averages it over the whole ring.  (16 nm
lateral biases heights by +0.2 nm on synthetic layers.)  The lowest plane, 9
nm, lets the height fit reach 19 nm above the NV from the 28 nm plane.  The
map is measured top down and stops above a plane where the lock could not
follow (NVs < 6.8 nm deep: at 9 nm, which leaves three planes, one short of
the cubic spline: the layer step is then reported as not done)."""
LAYER_PLANES_NM = (28.0, 32.0)
LAYER_STEP_NM = 4.0
LAYER_TAU_S = 6e-6
LAYER_SHOTS = 100_000
LAYER_EVOLUTION_SHOTS = 1_000_000
LAYER_EVOLUTION_TAUS_S = tuple(np.round(np.geomspace(0.1e-6, 10e-6, 40), 10))
HIDDEN_SPIN_COUPLING_HZ = 150e3
"""Coupling the (first) spin survey is designed for when a layer's decay hides any point
spin from the tip-free evolution, Hz."""
HIDDEN_SPIN_COUPLINGS_HZ = (HIDDEN_SPIN_COUPLING_HZ, 60e3)
"""Couplings the spin surveys are designed for under a layer that hides point spins: one
survey each (tau 3.3 and 8.3 us), so a spin of the envelope's 50 kHz still gets
w = 1 - cos(pi nu tau) >= 1 in one of them (a 91.5 kHz spin, seed 1123 of test_demo, gave
w = 0.12 at the 1.7 us that the tip-free layer decay's coherence chose), Hz."""


def axis_spec(start: float, stop: float, step: float) -> tuple[float, float, int]:
    """(start, stop, num) of a grid axis with ``step`` covering [start, stop] (stop rounded up)."""
    num = int(np.ceil((stop - start) / step - 1e-9)) + 1
    return float(start), float(start + (num - 1) * step), num


@dataclass(frozen=True)
class RasterDesign:
    """A DEER raster to measure: axes as the plans take them, RF, tau, shots.

    Attributes
    ----------
    x, y : (start, stop, num)
        Lateral axes, nm.
    z : tuple of float
        Apex heights, nm.
    rf_frequency_hz, rf_offset_hz : float
        RF carrier and its offset from the tip-free dark-spin line, Hz.
    tau_s : float
    shots : int
    """

    x: tuple[float, float, int]
    y: tuple[float, float, int]
    z: tuple[float, ...]
    rf_frequency_hz: float
    rf_offset_hz: float
    tau_s: float
    shots: int

    @property
    def n_points(self) -> int:
        """Raster points."""
        return self.x[2] * self.y[2] * len(self.z)

    def axes(self) -> tuple[NDArray, NDArray, NDArray]:
        """The x, y, z coordinate arrays, nm."""
        return (np.linspace(*self.x), np.linspace(*self.y), np.asarray(self.z, float))


def _plane_map(detuning: DetuningInterpolant, z: float, step: float = 0.25
               ) -> tuple[NDArray, NDArray, NDArray]:
    b = detuning.bounds
    if not b[2, 0] <= z <= b[2, 1]:
        raise NvmriError(f"the PSF map (z {b[2, 0]:g}..{b[2, 1]:g} nm) does not reach "
                         f"apex height {z:g} nm")
    xs = np.arange(b[0, 0], b[0, 1] + 1e-9, step)
    ys = np.arange(b[1, 0], b[1, 1] + 1e-9, step)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    return xs, ys, detuning(np.stack([gx, gy, np.full_like(gx, z)], -1))


def design_spin_raster(detuning: DetuningInterpolant, f_dark0_hz: float, tau_s: float,
                       z_plane_nm: float = SPIN_PLANE_NM,
                       top_margin_nm: float = SPIN_TOP_MARGIN_NM,
                       step_nm: float = SPIN_STEP_NM, shots: int = SPIN_SHOTS,
                       lateral_prior_nm: float = PRIOR_LATERAL_NM,
                       dz_prior_nm: tuple[float, float] = PRIOR_DZ_NM,
                       margin_nm: float = 2.0) -> RasterDesign:
    """Single-plane DEER raster that images any spin of the prior box as a full ring.

    The RF offset puts the resonant dome's top ``top_margin_nm`` above the
    plane (offset = max of Delta f_dark at that height): a spin at the
    deepest prior offset dz_lo (seen as if the tip were |dz_lo| higher) still
    shows a ring of radius ~6 nm.  The window is the bounding box of the
    largest ring (spin at dz_hi) grown by the lateral prior and ``margin_nm``.

    Parameters
    ----------
    detuning : DetuningInterpolant
        Measured Delta f_dark map (must reach z_plane - dz_hi and
        z_plane + top_margin).
    f_dark0_hz : float
        Tip-free dark-spin line centre, Hz.
    tau_s : float
        DEER free time (:func:`choose_tau`), s.
    z_plane_nm, top_margin_nm, step_nm : float
    shots : int
    lateral_prior_nm : float
        |dx|, |dy| bound of the offsets searched, nm.
    dz_prior_nm : (lo, hi)
        dz bounds of the offsets searched, nm.
    margin_nm : float

    Returns
    -------
    RasterDesign
    """
    _, _, top = _plane_map(detuning, z_plane_nm + top_margin_nm)
    if not np.isfinite(top).any():
        raise NvmriError("the PSF map has no values at the dome-top height")
    offset = float(np.nanmax(top))
    xs, ys, low = _plane_map(detuning, z_plane_nm - dz_prior_nm[1])
    inside = np.argwhere(np.nan_to_num(low, nan=-np.inf) >= offset)
    if inside.size == 0:
        raise NvmriError("no resonant ring in the DEER plane: check the PSF map")
    x_lo, x_hi = xs[inside[:, 0].min()], xs[inside[:, 0].max()]
    y_lo, y_hi = ys[inside[:, 1].min()], ys[inside[:, 1].max()]
    grow = lateral_prior_nm + margin_nm
    xc, yc = 0.5 * (x_lo + x_hi), 0.5 * (y_lo + y_hi)
    hx = step_nm * np.ceil((0.5 * (x_hi - x_lo) + grow) / step_nm)
    hy = step_nm * np.ceil((0.5 * (y_hi - y_lo) + grow) / step_nm)
    xc, yc = step_nm * np.round(xc / step_nm), step_nm * np.round(yc / step_nm)
    return RasterDesign(x=axis_spec(xc - hx, xc + hx, step_nm),
                        y=axis_spec(yc - hy, yc + hy, step_nm), z=(float(z_plane_nm),),
                        rf_frequency_hz=f_dark0_hz + offset, rf_offset_hz=offset,
                        tau_s=float(tau_s), shots=int(shots))


def design_fine_raster(detuning: DetuningInterpolant, survey: RasterDesign,
                       offsets_nm: ArrayLike, fwhm_hz: float, step_nm: float = SPIN_STEP_NM,
                       planes_nm: ArrayLike = SPIN_FINE_PLANES_NM, width_fwhm: float = 2.0,
                       margin_nm: float = 2.0) -> RasterDesign | None:
    """Fine DEER raster over the resonant rings of the spins a survey found.

    The ring of a spin at offset r' on a plane is where the RF is within
    ``width_fwhm`` line widths of resonance, |Delta f_dark(t - r') - offset| <=
    width_fwhm * fwhm_hz.  The window is the bounding box of every spin's
    ring on every plane, grown by ``margin_nm`` (room for the survey's
    position error) and kept inside the survey's window.

    Parameters
    ----------
    detuning : DetuningInterpolant
        Measured Delta f_dark map.
    survey : RasterDesign
        The survey raster (RF, tau, shots and window are kept).
    offsets_nm : array_like, (n, 3)
        Spin offsets from the NV found in the survey, nm.
    fwhm_hz : float
        Width of the tip-free dark-spin line (its flip probability), Hz.
    step_nm : float
        Lateral step, nm.
    planes_nm : array_like
        Planes above the survey's plane, nm.
    width_fwhm, margin_nm : float

    Returns
    -------
    RasterDesign or None
        None if no ring falls inside the survey's window.
    """
    offsets = np.atleast_2d(np.asarray(offsets_nm, float))
    z_planes = tuple(float(survey.z[0] + dz) for dz in np.atleast_1d(planes_nm))
    xs = np.arange(survey.x[0], survey.x[1] + 1e-9, 0.25)
    ys = np.arange(survey.y[0], survey.y[1] + 1e-9, 0.25)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    ring = np.zeros(gx.shape, bool)
    for z in z_planes:
        tips = np.stack([gx, gy, np.full_like(gx, z)], -1)
        for r in offsets:
            values = detuning(tips - r)
            ring |= np.abs(np.nan_to_num(values, nan=np.inf) - survey.rf_offset_hz) \
                <= width_fwhm * fwhm_hz
    if not ring.any():
        return None
    inside = np.argwhere(ring)

    def axis(values: NDArray, lo_i: int, hi_i: int, bounds: tuple[float, float, int]
             ) -> tuple[float, float, int]:
        lo = max(values[lo_i] - margin_nm, bounds[0])
        hi = min(values[hi_i] + margin_nm, bounds[1])
        lo = step_nm * np.floor(lo / step_nm)
        return axis_spec(lo, max(hi, lo + 3 * step_nm), step_nm)

    return RasterDesign(x=axis(xs, inside[:, 0].min(), inside[:, 0].max(), survey.x),
                        y=axis(ys, inside[:, 1].min(), inside[:, 1].max(), survey.y),
                        z=z_planes, rf_frequency_hz=survey.rf_frequency_hz,
                        rf_offset_hz=survey.rf_offset_hz, tau_s=survey.tau_s,
                        shots=survey.shots)


def _zoom_plane(detuning: DetuningInterpolant, spin_nm: NDArray, z: float, fwhm_hz: float,
                fraction: float, window_nm: float = 40.0,
                grid_nm: float = 0.5
                ) -> tuple[float, NDArray, float, float] | None:
    """On plane z: (RF offset, the ring point of finest lateral slice, its lateral and
    vertical slice widths in nm), or None if the map shows no ring there."""
    b = detuning.bounds
    xs = np.arange(max(b[0, 0] + spin_nm[0], spin_nm[0] - window_nm),
                   min(b[0, 1] + spin_nm[0], spin_nm[0] + window_nm) + 1e-9, grid_nm)
    ys = np.arange(max(b[1, 0] + spin_nm[1], spin_nm[1] - window_nm),
                   min(b[1, 1] + spin_nm[1], spin_nm[1] + window_nm) + 1e-9, grid_nm)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    tips = np.stack([gx, gy, np.full_like(gx, z)], -1)
    values, grad = detuning.value_and_gradient(tips - spin_nm)
    if not np.isfinite(values).any():
        return None
    offset = fraction * float(np.nanmax(values))
    ring = np.abs(np.nan_to_num(values, nan=np.inf) - offset) <= 0.5 * fwhm_hz
    if not ring.any():
        return None
    with np.errstate(divide="ignore"):
        lateral = fwhm_hz / np.hypot(grad[..., 0], grad[..., 1])
        vertical = fwhm_hz / np.abs(grad[..., 2])
    lateral = np.where(ring, lateral, np.inf)
    i = np.unravel_index(np.argmin(lateral), lateral.shape)
    return offset, tips[i], float(lateral[i]), float(vertical[i])


def design_zoom_raster(detuning: DetuningInterpolant, survey: RasterDesign, f_dark0_hz: float,
                       offset_nm: ArrayLike, fwhm_hz: float,
                       lateral_nm: float = SPIN_ZOOM_LATERAL_NM,
                       vertical_nm: float = SPIN_ZOOM_VERTICAL_NM,
                       step_nm: float = SPIN_ZOOM_STEP_NM, points: int = SPIN_ZOOM_POINTS,
                       fraction: float = SPIN_ZOOM_RING_FRACTION,
                       dz_prior_nm: tuple[float, float] = SEARCH_DZ_NM,
                       plane_step_nm: float = 1.0) -> RasterDesign | None:
    """A small, finely stepped DEER raster across the spin's ring, low enough to resolve it.

    From the survey's plane down to the lowest apex the measured map allows
    (every tip - r' of a spin in the prior box inside the map), the highest
    plane on which the map predicts a lateral slice width <= ``lateral_nm``
    and a vertical one <= ``vertical_nm`` at some point of the spin's ring
    (RF offset ``fraction`` of the largest Delta f_dark there); the raster
    is a ``points`` x ``points`` square of ``step_nm`` centred on that point.
    If no plane reaches the targets, the lowest plane is used.

    Parameters
    ----------
    detuning : DetuningInterpolant
        Measured Delta f_dark map.
    survey : RasterDesign
        Tau and shots are kept.
    f_dark0_hz : float
        Tip-free dark-spin line, Hz.
    offset_nm : array_like (3,)
        The spin's offset from the NV (survey fit), nm.
    fwhm_hz : float
        Width of the measured flip line, Hz.
    lateral_nm, vertical_nm, step_nm : float
    points : int
    fraction : float
    dz_prior_nm : (lo, hi)
        dz bounds of the offsets the fit searches (default: the envelope grown by
        ``SEARCH_MARGIN_NM``), nm.
    plane_step_nm : float
        Spacing of the candidate planes, nm.

    Returns
    -------
    RasterDesign or None
        None if the map shows no ring on any candidate plane.
    """
    spin = np.asarray(offset_nm, float)
    z_lowest = float(detuning.bounds[2, 0]) + dz_prior_nm[1]
    best = None
    for z in np.arange(survey.z[0], z_lowest - 1e-9, -plane_step_nm):
        found = _zoom_plane(detuning, spin, float(z), fwhm_hz, fraction)
        if found is None:
            continue
        best = (float(z), *found)
        if found[2] <= lateral_nm and found[3] <= vertical_nm:
            break
    if best is None:
        return None
    z, offset, centre, _, _ = best
    half = 0.5 * (points - 1) * step_nm
    cx, cy = (float(np.round(c / 0.05) * 0.05) for c in centre[:2])
    return RasterDesign(x=(round(cx - half, 3), round(cx + half, 3), points),
                        y=(round(cy - half, 3), round(cy + half, 3), points), z=(z,),
                        rf_frequency_hz=f_dark0_hz + offset, rf_offset_hz=offset,
                        tau_s=survey.tau_s, shots=survey.shots)


def design_layer_raster(detuning: DetuningInterpolant, f_dark0_hz: float,
                        planes_nm: ArrayLike = LAYER_PLANES_NM, step_nm: float = LAYER_STEP_NM,
                        top_below_nm: float = 4.0, half_width_nm: float = 30.0,
                        tau_s: float = LAYER_TAU_S, shots: int = LAYER_SHOTS) -> RasterDesign:
    """DEER raster for a spin layer above the NV.

    The RF offset puts the resonant dome's top ``top_below_nm`` below the
    lowest plane, so a layer h >= top_below_nm above the NV is resonant on a
    ring of the layer plane for every plane.  The window is centred on the
    dome's top, +/- ``half_width_nm``.

    Returns
    -------
    RasterDesign
    """
    planes = tuple(float(z) for z in np.atleast_1d(planes_nm))
    xs, ys, top = _plane_map(detuning, min(planes) - top_below_nm)
    offset = float(np.nanmax(top))
    i, j = np.unravel_index(np.nanargmax(top), top.shape)
    xc = step_nm * np.round(xs[i] / step_nm)
    yc = step_nm * np.round(ys[j] / step_nm)
    return RasterDesign(x=axis_spec(xc - half_width_nm, xc + half_width_nm, step_nm),
                        y=axis_spec(yc - half_width_nm, yc + half_width_nm, step_nm),
                        z=planes, rf_frequency_hz=f_dark0_hz + offset, rf_offset_hz=offset,
                        tau_s=float(tau_s), shots=int(shots))


def spectrum_axis(f_line_hz: float, quick: bool = False) -> tuple[float, float, int]:
    """A tip-free DEER spectrum's RF axis: the predicted line +/- :data:`SPECTRUM_SPAN_HZ`
    in :data:`SPECTRUM_POINTS` points (about half with ``quick``: tests), Hz."""
    num = SPECTRUM_POINTS if not quick else SPECTRUM_POINTS // 2 + 1
    return f_line_hz - SPECTRUM_SPAN_HZ, f_line_hz + SPECTRUM_SPAN_HZ, num


def repeat_evolution_shots(factor: float) -> int | None:
    """Shots of the tip-free evolution's repeat, whose counts add to the first run's, for
    ``factor`` times its shots in all (``crosscheck.evolution_shot_factor``); None: no
    repeat (nothing to gain, or more than :data:`EVOLUTION_MAX_SHOT_FACTOR` needed)."""
    if not 1.0 < factor <= EVOLUTION_MAX_SHOT_FACTOR:
        return None
    return (int(np.ceil(factor)) - 1) * SPIN_SHOTS


def unseen(offsets: list[NDArray], known: list[NDArray]) -> list[NDArray]:
    """The offsets not within :data:`SAME_SPIN_NM` of any known one (new spins), nm."""
    return [o for o in offsets if all(np.linalg.norm(o - k) >= SAME_SPIN_NM for k in known)]


def choose_tau(nu_hz: float, t2_s: float = 20e-6, exponent: float = 1.5,
               tau_min_s: float = 1e-6, tau_max_s: float = 30e-6,
               coherence: Callable[[NDArray], NDArray] | None = None) -> float:
    """DEER free time maximising the signal E(tau) w(nu, tau) of a spin coupled by nu.

    Parameters
    ----------
    nu_hz : float
        |nu| from the tip-free evolution, Hz.
    t2_s, exponent : float
        Echo decay exp(-(tau/T2)^n) (measured with ``echo``), s.
    tau_min_s, tau_max_s : float
        Allowed range (tau_min leaves room for the RF pulse inside the echo), s.
    coherence : callable, optional
        Further measured coherence loss at tau (a layer's decay,
        ``EvolutionContent.layer_coherence``), multiplying the signal.

    Returns
    -------
    float
        tau, s.
    """
    taus = np.linspace(tau_min_s, tau_max_s, 6000)
    gain = physics.echo_coherence(taus, t2_s, exponent) * physics.deer_weight(nu_hz, taus)
    if coherence is not None:
        gain = gain * coherence(taus)
    return float(taus[int(np.argmax(gain))])
