"""Frequency lock: keep the MW source on the NV resonance as the tip moves.

The lock probes the CW ODMR line with three gates that ride along in every
acquisition's pulse program (``lock_0`` at -FWHM/2, ``lock_1`` at +FWHM/2 and
``lock_2`` far off resonance as the fluorescence reference), so one trigger
per point both measures and locks.  The pair of dips gives the offset
f_nv - f_mw in closed form (:func:`nvmri_bluesky.physics.odmr_pair_offset`);
the pair alone cannot tell a line inside its capture range from one 1-1.5 FWHM
away (the same two dips), so a Lorentzian scan over all lock gates vetoes such
aliases (:meth:`FrequencyLock.line_scan`).

When the offset leaves the pair's capture range (|offset| > 0.65 FWHM) the
lock is *lost* and re-acquires (counted in ``lock_reacquisitions``): from the
finder gates that ride along in the same program (+/- 1.5 ... 12 FWHM), or,
if no gate sees the line, with a comb program (a whole ODMR spectrum in one
acquisition, sidebands over a wide span) before going back to the
measurement program.  It never leaves the MW source
silently off resonance: a point is only recorded once the residual offset is
inside the tolerance, or the plan fails with :class:`LockLost`, whose message
says where and why.

The lock's *reach* (:data:`LOCK_REACH_HZ`) is the largest miss of the
prediction it recovers from: the widest comb.  A map measured from high to
low apex stops descending where the misses of the planes above, extrapolated
(:func:`next_plane_miss_hz`), exceed it.

The lock is an ophyd ``Device`` of soft signals (``lock_frequency``,
``lock_error``) so its result is read into the same event as the counts.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device

from nvmri_bluesky import physics, pulses
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans.stubs import UnitSignal, acquire, load_program, set_frequency

LOCK_WINDOW_S = 10e-6
"""CW counting window of each lock gate per shot, s."""
FINDER_FWHM = (1.5, 3.0, 5.0, 8.0, 12.0)
"""Finder gates at +/- these multiples of the FWHM: a coarse spectrum in every acquisition."""
ALIAS_DCHI2 = 16.0
"""Chi^2 margin (4 sigma) of the all-gate line scan (:meth:`FrequencyLock.line_scan`): by
which a line outside the pair's capture range must beat every line inside to overrule a
fine pair estimate, and by which a line inside must beat "no line" to stand in for a
failed pair estimate."""
REACQUIRE_SPANS_HZ = (60e6, 600e6)
"""Half-spans of the comb spectra that find a lost line, tried in order, Hz."""
LOCK_REACH_HZ = max(REACQUIRE_SPANS_HZ)
"""The largest miss of the predicted line frequency the lock recovers from, Hz."""
PLANE_GROWTH = 2.0
"""Growth of the worst miss per plane assumed when only one plane is known (the misses
of an 8 nm-step map grow 1.2-2x per plane in the envelope of NVs 6-16 nm deep)."""


class LockLost(NvmriError):
    """The lock lost the NV line and could not follow it: the message says where and why."""


def next_plane_miss_hz(plane_misses_hz: Sequence[float]) -> float:
    """Worst prediction miss expected on the next plane of a map measured top down, Hz.

    The misses grow as the tip approaches the NV (the field's curvature over a
    grid step grows roughly geometrically per plane): the worst miss of the
    last plane times its growth from the plane before (at least 1), or times
    :data:`PLANE_GROWTH` when only one plane is known.

    Parameters
    ----------
    plane_misses_hz : sequence of float
        Worst |predicted - locked| frequency of each plane measured so far,
        top plane first, Hz.

    Returns
    -------
    float
        The expected worst miss on the next plane, Hz (0 before any plane).
    """
    misses = [float(m) for m in plane_misses_hz]
    if not misses:
        return 0.0
    if len(misses) == 1 or misses[-2] <= 0:
        return misses[-1] * PLANE_GROWTH
    return misses[-1] * max(misses[-1] / misses[-2], 1.0)


def lock_detunings(fwhm_hz: float) -> tuple[float, ...]:
    """MW sidebands of the lock gates for a line of width ``fwhm_hz``, Hz.

    ``lock_0``/``lock_1`` at -/+ FWHM/2 (the error signal), ``lock_2`` 25 FWHM
    away (fluorescence reference), then finder gates at -/+ FINDER_FWHM.
    """
    finders = [sign * k * fwhm_hz for k in FINDER_FWHM for sign in (-1.0, 1.0)]
    return (-fwhm_hz / 2.0, fwhm_hz / 2.0, 25.0 * fwhm_hz, *finders)


def lock_program(fwhm_hz: float) -> pulses.Program:
    """The lock-only program (PSF maps, retracted-tip references)."""
    return pulses.frequency_lock(lock_detunings(fwhm_hz), window=LOCK_WINDOW_S)


class FrequencyLock(Device):
    """Soft readings and settings of the NV frequency lock.

    Parameters
    ----------
    fwhm_hz : float
        CW ODMR line width the lock gates are placed for, Hz.
    tolerance_hz : float
        Largest residual offset accepted at a recorded point, Hz.
    max_iterations : int
        Re-triggers per point before the lock is declared lost.
    reacquire_spans_hz : sequence of float
        Half-spans of the comb sweeps used to find a lost line, tried in order.
    min_contrast : float
        A pair contrast below this means the line is gone.
    """

    frequency = Cpt(UnitSignal, value=np.nan, units="Hz", kind="hinted")
    error = Cpt(UnitSignal, value=np.nan, units="Hz", kind="normal")
    reacquisitions = Cpt(UnitSignal, value=0, units="", kind="normal")

    def __init__(self, *args: Any, fwhm_hz: float = 1 / physics.TAU_CW_S,
                 tolerance_hz: float = 0.5e6, max_iterations: int = 6,
                 reacquire_spans_hz: Sequence[float] = REACQUIRE_SPANS_HZ,
                 min_contrast: float = 0.04, name: str = "lock", **kwargs: Any) -> None:
        super().__init__(*args, name=name, **kwargs)
        self.fwhm_hz = fwhm_hz
        self.tolerance_hz = tolerance_hz
        self.max_iterations = max_iterations
        self.reacquire_spans_hz = tuple(reacquire_spans_hz)
        self.min_contrast = min_contrast

    @property
    def detunings(self) -> tuple[float, float, float]:
        return lock_detunings(self.fwhm_hz)

    def noise(self, counts: dict[str, float]) -> float:
        """Photon-noise sigma of the pair's offset estimate near the line centre, Hz.

        With I0 counts in the reference gate and CW contrast C, the pair
        difference gives sigma ~ FWHM / (C sqrt(2 I0)).
        """
        ref = max(counts["lock_2"], 1.0)
        dips = 1 - (counts["lock_0"] + counts["lock_1"]) / (2 * ref)
        contrast = max(2 * dips, self.min_contrast)      # C L(FWHM/2) = C/2
        return self.fwhm_hz / (contrast * np.sqrt(2 * ref))

    def offset(self, counts: dict[str, float]) -> tuple[float, bool]:
        """f_nv - f_mw from one acquisition's lock gates, Hz, and whether it is fine.

        Fine: from the pair at -/+ FWHM/2, unless the finder gates show that
        the pair saw an alias of a line outside its capture range (see
        :meth:`line_scan`); then, or when the pair gives no estimate, the
        Lorentzian fit over all lock gates (fine if inside the capture range),
        else the deepest finder gate (coarse).  (nan, False) when no gate sees
        the line.
        """
        ref = counts["lock_2"]
        if not ref > 0:
            return np.nan, False
        u, contrast = physics.odmr_pair_offset(1 - counts["lock_0"] / ref,
                                               1 - counts["lock_1"] / ref)
        pair_fine = bool(np.isfinite(u) and contrast > self.min_contrast and abs(u) < 0.65)
        scan = self.line_scan(counts)
        if scan is not None:
            grid, chi2, amp = scan
            inside = np.abs(grid) < 0.65
            i_in = int(np.argmin(np.where(inside, chi2, np.inf)))
            i_out = int(np.argmin(np.where(inside, np.inf, chi2)))
            if chi2[i_in] - chi2[i_out] > ALIAS_DCHI2:       # the line is outside the pair
                return float(grid[i_out]) * self.fwhm_hz, False
            if pair_fine:
                return float(u) * self.fwhm_hz, True
            if -chi2[i_in] > ALIAS_DCHI2 and amp[i_in] > self.min_contrast:
                return _refine(grid, chi2, i_in) * self.fwhm_hz, True
        elif pair_fine:
            return float(u) * self.fwhm_hz, True
        detunings = lock_detunings(self.fwhm_hz)
        dips = {d: 1 - counts.get(f"lock_{i}", ref) / ref for i, d in enumerate(detunings)
                if i != 2}
        d_best = max(dips, key=dips.get)
        noise = 4.0 / np.sqrt(ref)
        if dips[d_best] > max(self.min_contrast / 2, noise):
            return float(d_best), False
        return np.nan, False

    def line_scan(self, counts: dict[str, float]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Lorentzian fit over the pair and finder gates, scanned in the line offset.

        The pair ratio rho = -2u/(1 + 2u^2) is not monotonic: a line at
        u' = 1/(2u), outside the capture range (|u'| > 1/sqrt(2)), gives the
        same two dips as one at u (with another contrast), so the pair alone
        would lock a line 1-1.5 FWHM away to within 0.5 FWHM of the MW.  The
        finder gates that ride along in every acquisition tell the branches
        apart.  Poisson-weighted least squares, contrast free, at offsets u
        (FWHM units) over the finders' span.

        Returns
        -------
        (u, chi2, contrast) : ndarrays, or None without finder gates
            chi2 relative to "no line" (0); the best contrast at each u.
        """
        ref = counts["lock_2"]
        idx = tuple(i for i in range(len(lock_detunings(1.0)))
                    if i != 2 and f"lock_{i}" in counts)
        if len(idx) < 4:
            return None
        raw = np.array([counts[f"lock_{i}"] for i in idx])
        dips = 1 - raw / ref
        weight = ref**2 / np.maximum(raw, 1.0)                 # 1 / var(dip)
        grid, shape, shape2 = _line_scan(idx)
        proj = shape @ (weight * dips)
        norm = shape2 @ weight
        chi2 = -np.where(proj > 0, proj**2 / norm, 0.0)
        return grid, chi2, proj / norm


def _refine(grid: np.ndarray, values: np.ndarray, i: int) -> float:
    """Parabolic refinement of the minimum ``values[i]`` on a uniform ``grid``."""
    if not 0 < i < len(grid) - 1:
        return float(grid[i])
    y0, y1, y2 = values[i - 1:i + 2]
    denom = y0 - 2 * y1 + y2
    frac = 0.5 * (y0 - y2) / denom if denom > 0 else 0.0
    return float(grid[i] + np.clip(frac, -1.0, 1.0) * (grid[1] - grid[0]))


@lru_cache(maxsize=8)
def _line_scan(gates: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trial line offsets u (FWHM units), the unit Lorentzian dips of ``gates`` at each and
    their squares: the design of :meth:`FrequencyLock.line_scan`."""
    det = np.array(lock_detunings(1.0))[list(gates)]
    span = float(np.max(np.abs(det))) + 2.0
    grid = np.arange(-span, span + 0.005, 0.01)
    shape = physics.lorentzian(det[None, :] - grid[:, None], 1.0)
    return grid, shape, shape**2


def gate_counts(gates: Sequence[str], counts: Sequence[float]) -> dict[str, float]:
    """Map a counter waveform onto the program's gate names."""
    if len(counts) < len(gates):
        raise NvmriError(f"counter returned {len(counts)} gates, program has {len(gates)}")
    return dict(zip(gates, np.asarray(counts, float), strict=False))


def find_line(devices: Any, lock: FrequencyLock, centre_hz: float,
              restore: pulses.Program) -> Generator[Any, Any, float]:
    """Re-acquire a lost line: comb spectra of growing span around ``centre_hz``.

    Parameters
    ----------
    devices
        The instrument (``mw``, ``pulser``, ``counter``).
    lock : FrequencyLock
        Supplies the line width and the spans.
    centre_hz : float
        Where to look first (the last good or predicted frequency), Hz.
    restore : Program
        The program to load again once the line is found.

    Yields
    ------
    Msg
        Loads, sets and triggers.

    Returns
    -------
    float
        The line centre, Hz.
    """
    step = lock.fwhm_hz / 3.0
    yield from set_frequency(devices.mw, centre_hz)
    for span in lock.reacquire_spans_hz:
        detunings = np.arange(-span, span + step / 2, step)
        yield from load_program(devices.pulser, pulses.odmr_comb(tuple(detunings)))
        found = _comb_minimum(detunings, np.asarray((yield from acquire(devices.counter))),
                              lock.min_contrast)
        if found is not None:
            yield from load_program(devices.pulser, restore)
            return centre_hz + found
    raise LockLost(f"frequency lock lost near {centre_hz / 1e9:.4f} GHz: no NV line within "
                     f"+/-{max(lock.reacquire_spans_hz) / 1e6:.0f} MHz (is the laser on, "
                     "the MW output on, the NV in focus?)")


def _comb_minimum(detunings: np.ndarray, counts: np.ndarray, min_contrast: float) -> float | None:
    """Detuning of the deepest dip of a comb spectrum, refined by a parabola; None if flat."""
    base = np.median(counts)
    if base <= 0:
        return None
    smooth = np.convolve(counts, np.ones(3) / 3, mode="same")
    i = int(np.argmin(smooth[1:-1])) + 1
    depth = 1 - smooth[i] / base
    noise = 3 * np.sqrt(base / 3) / base
    if depth < max(min_contrast, noise):
        return None
    return _refine(detunings, smooth, i)


def locked_acquire(devices: Any, lock: FrequencyLock, program: pulses.Program,
                   predicted_hz: float, tuned: bool = False
                   ) -> Generator[Any, Any, dict[str, float]]:
    """Acquire one point with the MW source locked to the NV line.

    Triggers the loaded ``program`` (which must contain the lock gates), and
    re-centres the MW source and triggers again until the residual offset is
    within ``lock.tolerance_hz``; a lost line is re-acquired first.  On return
    the lock's soft signals hold the locked frequency and the last residual.

    Parameters
    ----------
    devices
        The instrument (``mw``, ``pulser``, ``counter``).
    lock : FrequencyLock
    program : Program
        The loaded measurement program (with ``lock_0..2`` gates).
    predicted_hz : float
        Where the line is expected at this point, Hz.
    tuned : bool
        The MW source already sits at ``predicted_hz`` (set with the move).

    Yields
    ------
    Msg

    Returns
    -------
    dict
        Gate name -> counts of the accepted acquisition.
    """
    f_mw = predicted_hz
    if not tuned:
        yield from set_frequency(devices.mw, f_mw)
    for _ in range(lock.max_iterations):
        counts = gate_counts(program.gate_names, (yield from acquire(devices.counter)))
        offset, fine = lock.offset(counts)
        if fine and abs(offset) <= lock.tolerance_hz:
            return _record(lock, f_mw, offset, counts)
        if not fine:                       # outside the pair's capture range: lost
            lock.reacquisitions.put(lock.reacquisitions.get() + 1)
        f_mw = (f_mw + offset if np.isfinite(offset)
                else (yield from find_line(devices, lock, f_mw, program)))
        yield from set_frequency(devices.mw, f_mw)
    # Photon noise can keep a settled lock's residual above the tolerance: one
    # more acquisition at the latest estimate is kept, with its residual
    # recorded (never silently), when that residual is within its own noise
    # (3 sigma) or a quarter of the line.
    counts = gate_counts(program.gate_names, (yield from acquire(devices.counter)))
    offset, fine = lock.offset(counts)
    limit = max(lock.tolerance_hz, lock.fwhm_hz / 4, 3 * lock.noise(counts))
    if fine and abs(offset) <= limit:
        return _record(lock, f_mw, offset, counts)
    raise LockLost(f"frequency lock did not settle within {lock.max_iterations + 1} "
                     f"acquisitions near {f_mw / 1e9:.4f} GHz")


def _record(lock: FrequencyLock, f_mw: float, offset: float,
            counts: dict[str, float]) -> dict[str, float]:
    """Put the accepted acquisition's result in the lock's soft signals."""
    lock.frequency.put(f_mw + offset)
    lock.error.put(offset)
    return counts


class Predictor:
    """Predict the NV line at the next raster point from the points locked so far.

    Takes the nearest locked point q and extrapolates linearly along the step
    s = p - q when the point q - s was locked too: 2 f(q) - f(q - s).  On a
    grid this follows the fast axis, turns at line ends (from the previous
    line) and enters a new plane (from the two planes below), without a
    field model.  With nothing to extrapolate from it returns f(q).
    """

    def __init__(self, start_hz: float, resolution_nm: float = 1e-3) -> None:
        self.start_hz = start_hz
        self.resolution_nm = resolution_nm
        self._points = np.empty((0, 3))
        self._freqs: dict[tuple[int, ...], float] = {}

    def _key(self, position: np.ndarray) -> tuple[int, ...]:
        return tuple(np.round(position / self.resolution_nm).astype(int))

    def add(self, position: Sequence[float], frequency_hz: float) -> None:
        """Record the locked frequency (Hz) at a tip position (nm)."""
        p = np.asarray(position, float)
        if self._key(p) not in self._freqs:
            self._points = np.vstack([self._points, p])
        self._freqs[self._key(p)] = float(frequency_hz)

    def __call__(self, position: Sequence[float]) -> float:
        if not len(self._points):
            return self.start_hz
        p = np.asarray(position, float)
        d2 = np.sum((self._points - p) ** 2, axis=1)
        nearest = np.flatnonzero(d2 <= d2.min() * (1 + 1e-6) + self.resolution_nm**2)
        for i in nearest[::-1]:                       # newest first
            q = self._points[i]
            f_r = self._freqs.get(self._key(2 * q - p))
            if f_r is not None:
                return 2 * self._freqs[self._key(q)] - f_r
        return self._local_plane(p, np.argsort(d2)[:8])

    def _local_plane(self, p: np.ndarray, idx: np.ndarray) -> float:
        """Least-squares plane through the nearest locked points, evaluated at p."""
        pts = self._points[idx]
        f = np.array([self._freqs[self._key(q)] for q in pts])
        centre, f0 = pts.mean(axis=0), f.mean()
        if len(idx) < 3:
            return float(f[0])
        grad = np.linalg.lstsq(pts - centre, f - f0, rcond=1e-6)[0]
        return float(f0 + grad @ (p - centre))
