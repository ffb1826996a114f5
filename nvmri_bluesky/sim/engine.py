"""The simulated instrument: state, and how a pulse program turns into counts.

Pure Python and numpy, no Channel Access (``sim.ioc`` serves it).  Every
formula comes from :mod:`nvmri_bluesky.physics`.

How a gate is read (``docs/architecture.md``).  The MW drive frequency is the
carrier plus the pulse's sideband ``detuning``; it drives whichever NV
transition, ms=0->+1 (f+) or ms=0->-1 (|f-|), is nearer.

- *CW ODMR*: a MW pulse overlaps the counted laser pulse.  Counts =
  shots * 100 kcounts/s * window * ``odmr_fluorescence``.
- *Pulsed*: the MW pulses between the initialising laser pulse (the last one
  before the readout) and the counted one: 0 pulses bright (P0 = 1), 1 pulse
  Rabi (``rabi_flip_probability`` with the actual pulse length), 2 pulses
  Ramsey (tau = gap, ``ramsey_p0``), 3 pulses Hahn echo (tau = both gaps,
  ``echo_coherence``) or DEER when an RF pulse overlaps the middle MW pulse
  (``deer_coherence``).  Ramsey and echo pulses are taken as ideal pi/2 and
  pi pulses whose contrast is scaled by the off-resonant Rabi amplitude A =
  Omega^2/(Omega^2 + Delta^2): P0 = 1 - A (1 - P0_ideal).  Counts are
  Poisson with mean ``expected_counts(P0, shots)``.

The MW Rabi frequency follows the MW power (``physics.rabi_from_power``):
:data:`~nvmri_bluesky.physics.MW_RABI_HZ` (20 MHz, pi = 25 ns) at
:data:`~nvmri_bluesky.physics.MW_REF_POWER_DBM`, times 10^((P - P_ref)/20).  MW output Off: no NV
drive (CW gates read I0, pulsed gates P0 = 1).  The RF pulse is a pi pulse of
its own length on the dark spins (``dark_flip_probability`` at f_rf - f_j,
f_j = ``dark_spin_frequency`` of B0 + the tip field at spin j); RF output Off
flips nothing.

Simulated time advances by shots * program duration per acquisition and by
distance / velocity per stage move; the tip apex drifts from the stage
readback by ``tip.drift_nm_per_s`` times it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.physics import MW_RABI_HZ, MW_REF_POWER_DBM
from nvmri_bluesky.pulses import Gate, Program
from nvmri_bluesky.sim.scenario import Scenario, load_scenario

__all__ = ["Engine", "Source", "MW_REF_POWER_DBM", "AXES", "MAX_SHOTS", "MAX_SHOT_S",
           "MAX_ACQUISITION_S"]

MAX_SHOTS = 1_000_000_000
"""Most shots per gate per acquisition."""
MAX_SHOT_S = 1.0
"""Longest pulse program (one shot of every gate), s."""
MAX_ACQUISITION_S = 86400.0
"""Longest acquisition, shots * program duration, simulated s."""

AXES = ("x", "y", "z")

_CW, _BRIGHT, _RABI, _RAMSEY, _ECHO, _DEER = range(6)
_EPS = 1e-12            # s: pulse edges closer than this touch


@dataclass
class Source:
    """A signal generator: carrier (Hz), power (dBm), output on/off."""

    freq_hz: float
    power_dbm: float
    on: bool = False


@dataclass(frozen=True)
class _Compiled:
    """A program reduced to per-gate arrays, shape (n_gates,) each.

    ``duration`` is ``program.duration`` (one shot of every gate, s) and
    ``deer`` the indices of the DEER gates, both fixed by the program.
    """

    program: Program
    kind: NDArray
    mw_detuning: NDArray
    mw_duration: NDArray
    tau: NDArray
    window: NDArray
    rf_detuning: NDArray
    rf_duration: NDArray
    duration: float
    deer: NDArray


def _read_gate(gate: Gate) -> tuple[int, float, float, float, float, float, float]:
    """(kind, mw detuning, mw duration, tau, window, rf detuning, rf duration) of a gate."""
    where = f"gate {gate.name!r}"
    window, readout = gate.counter, gate.readout
    mw, rf = gate.on("mw"), gate.on("rf")
    cw = [p for p in mw if p.overlaps(readout)]
    if cw:
        if len(mw) != 1 or rf:
            raise NvmriError(f"{where}: a CW ODMR gate takes exactly one MW pulse (over the "
                             "counted laser pulse) and no RF")
        return _CW, cw[0].detuning, 0.0, 0.0, window.duration, 0.0, 0.0
    before = [p for p in gate.on("laser") if p.stop <= readout.start + _EPS]
    t_init = before[-1].stop if before else 0.0
    seq = [p for p in mw if p.start >= t_init - _EPS and p.stop <= readout.start + _EPS]
    if len(seq) != len(mw):
        raise NvmriError(f"{where}: MW pulses must lie between the initialising and the "
                         "counted laser pulse (or overlap the counted one for CW ODMR)")
    if len({p.detuning for p in seq}) > 1:
        raise NvmriError(f"{where}: the MW pulses of one gate must share one detuning")
    if len(seq) > 3:
        raise NvmriError(f"{where}: {len(seq)} MW pulses; the simulator reads 0 (bright), "
                         "1 (Rabi), 2 (Ramsey) or 3 (echo/DEER)")
    det = seq[0].detuning if seq else 0.0
    gaps = [b.start - a.stop for a, b in zip(seq, seq[1:], strict=False)]
    if rf and (len(seq) != 3 or len(rf) != 1 or not rf[0].overlaps(seq[1])):
        raise NvmriError(f"{where}: RF is simulated only as one pulse overlapping the middle "
                         "(pi) pulse of a 3-pulse echo (DEER)")
    if len(seq) == 3:
        kind = _DEER if rf else _ECHO
        return (kind, det, 0.0, sum(gaps), 0.0, rf[0].detuning if rf else 0.0,
                rf[0].duration if rf else 0.0)
    kind = (_BRIGHT, _RABI, _RAMSEY)[len(seq)]
    return kind, det, seq[0].duration if seq else 0.0, sum(gaps), 0.0, 0.0, 0.0


def _compile(program: Program) -> _Compiled:
    rows = np.array([_read_gate(g) for g in program.gates], float).reshape(-1, 7)
    kind = rows[:, 0].astype(int)
    return _Compiled(program, kind, *rows[:, 1:].T, duration=program.duration,
                     deer=np.flatnonzero(kind == _DEER))


class Engine:
    """The simulated NV-MRI instrument.

    Parameters
    ----------
    scenario : Scenario, str, path or dict, optional
        Sample and instrument (see :func:`~nvmri_bluesky.sim.scenario.load_scenario`).
    time_scale : float
        Wall seconds per simulated second for acquisitions and moves (0:
        instant).  Simulated time always advances by the real durations.

    Attributes
    ----------
    position : ndarray, shape (3,)
        Stage readback (x, y, z), nm.
    mw, rf : Source
        Microwave (NV) and radio-frequency (dark-spin) sources.
    shots : int
        Shots per gate per acquisition.
    time_s : float
        Simulated time, s.
    acquisitions : int
        Acquisitions taken so far.
    laser_on : bool
        False while a ``laser_off`` fault holds: counts are zero.
    instrument : physics.Instrument
        The scenario's sensor, tip and bath parameters.
    spins : ndarray, shape (n, 3)
        Dark-spin positions, nm (drawn once from the scenario's seed).
    couplings : ndarray, shape (n,)
        Their dipolar couplings to the NV, Hz (cached).
    """

    def __init__(self, scenario: Scenario | str | Mapping[str, Any] | None = None,
                 time_scale: float = 0.0):
        self.scenario = load_scenario(scenario)
        self.instrument = self.scenario.instrument()
        self.time_scale = float(time_scale)
        self.rng = np.random.default_rng([self.scenario.seed, 1])
        self.position = np.array(self.scenario.stage.start_nm, float)
        self.mw = Source(freq_hz=physics.D_ZFS, power_dbm=MW_REF_POWER_DBM)
        self.rf = Source(freq_hz=3.0e9, power_dbm=0.0)
        self.shots = 1000
        self.time_s = 0.0
        self.acquisitions = 0
        self.laser_on = True
        self._compiled: _Compiled | None = None
        inst = self.instrument
        self.spins = self.scenario.spin_positions()
        self.couplings = physics.dipolar_coupling(self.spins - inst.nv_position_nm,
                                                  inst.nv_axis)
        self._drift = np.array(self.scenario.tip.drift_nm_per_s, float)
        # expected_counts() caches what depends only on the tip and the field
        # (one entry each: a raster acquires several times per tip position)
        self._lines: tuple[bytes, tuple[NDArray, NDArray]] | None = None
        self._deer_cache: tuple[tuple, NDArray] | None = None
        self._echo: NDArray | None = None      # E(tau) of every gate of the program

    # ------------------------------------------------------------ state

    @property
    def program(self) -> Program | None:
        """The loaded pulse program."""
        return self._compiled.program if self._compiled else None

    @property
    def gate_names(self) -> list[str]:
        return self.program.gate_names if self.program else []

    def limits(self, axis: str) -> tuple[float, float]:
        """Stage travel of ``axis`` (z: from ``z_min_nm``), nm."""
        st = self.scenario.stage
        return {"x": st.x_range_nm, "y": st.y_range_nm,
                "z": (self.scenario.z_min_nm, st.z_max_nm)}[axis]

    def check_move(self, axis: str, target: float) -> None:
        """Raise :class:`NvmriError` if ``target`` is outside the travel of ``axis``."""
        lo, hi = self.limits(axis)
        if not lo <= target <= hi:
            what = " (below z_min: a tip crash)" if axis == "z" and target < lo else ""
            raise NvmriError(f"stage {axis} = {target} nm refused: outside [{lo}, {hi}] nm{what}")

    def move(self, axis: str, target: float, velocity_nm_per_s: float | None = None) -> float:
        """Move the stage; return the move's duration in simulated seconds."""
        self.check_move(axis, target)
        i = AXES.index(axis)
        v = velocity_nm_per_s or self.scenario.stage.velocity_nm_per_s
        if not (np.isfinite(v) and v > 0):
            raise NvmriError(f"stage {axis}: velocity {v!r} nm/s must be finite and > 0")
        dt = abs(float(target) - self.position[i]) / v
        self.position[i] = float(target)
        self.time_s += dt
        return dt

    def apex(self) -> NDArray:
        """True tip apex now: stage readback plus drift, shape (3,), nm."""
        return physics.apex_with_drift(self.position, self._drift, self.time_s)

    @property
    def stage_ok(self) -> bool:
        """False once the drifting apex is below ``z_min_nm`` (a crash)."""
        return bool(self.apex()[2] >= self.scenario.z_min_nm - 1e-9)

    def load(self, program: Program | str | Mapping[str, Any]) -> Program:
        """Validate and load a pulse program (object, JSON text or dict).

        Raises
        ------
        NvmriError
            The program is malformed or has a gate the simulator cannot read.
        """
        if not isinstance(program, Program):
            program = Program.from_json(program)
        else:
            program.validate()
        if not 0 < program.duration <= MAX_SHOT_S:
            raise NvmriError(f"program {program.name!r} lasts {program.duration:.6g} s per shot; "
                             f"the simulator takes programs of at most {MAX_SHOT_S:g} s")
        if not self._acquisition_ok(self.shots, program.duration):
            raise NvmriError(f"program {program.name!r} at {self.shots} shots would acquire for "
                             f"{self.shots * program.duration:.6g} s; at most "
                             f"{MAX_ACQUISITION_S:g} s")
        compiled = _compile(program)
        for t_pi in np.unique(compiled.rf_duration[compiled.kind == _DEER]):
            physics.dark_flip_probability(0.0, t_pi, self.instrument.dark_t2_star_s)  # warm
        inst = self.instrument
        self._echo = physics.echo_coherence(compiled.tau, inst.nv_t2_s, inst.nv_t2_exponent)
        self._deer_cache = None
        self._compiled = compiled
        return program

    @staticmethod
    def _acquisition_ok(shots: int, duration_s: float) -> bool:
        return shots * duration_s <= MAX_ACQUISITION_S

    def set_shots(self, shots: Any) -> int:
        """Set the shots per gate per acquisition; return them.

        Raises
        ------
        NvmriError
            Not an integer in 1..``MAX_SHOTS``, or an acquisition of the loaded
            program would last longer than ``MAX_ACQUISITION_S``.
        """
        try:
            value = int(shots)
            exact = value == shots
        except (TypeError, ValueError, OverflowError):
            exact = False
        if not exact or not 1 <= value <= MAX_SHOTS:
            raise NvmriError(f"shots must be an integer in 1..{MAX_SHOTS}, got {str(shots)[:40]}")
        duration = self._compiled.duration if self._compiled else 0.0
        if not self._acquisition_ok(value, duration):
            raise NvmriError(f"{value} shots of the loaded program would acquire for "
                             f"{value * duration:.6g} s; at most {MAX_ACQUISITION_S:g} s")
        self.shots = value
        return value

    def acquisition_time(self) -> float:
        """Simulated length of one acquisition, shots * program duration, s."""
        return self.shots * (self._compiled.duration if self._compiled else 0.0)

    def faults_starting(self, kind: str) -> list:
        """Faults of ``kind`` that start with the next acquisition."""
        return [f for f in self.scenario.faults
                if f.kind == kind and f.after_acquisitions == self.acquisitions]

    # ------------------------------------------------------------ physics

    def _field_jump(self, index: int) -> NDArray:
        hz = sum(f.hz for f in self.scenario.faults
                 if f.kind == "frequency_jump" and index >= f.after_acquisitions)
        return hz / physics.GAMMA_E * self.instrument.nv_axis

    def expected_counts(self) -> NDArray:
        """Mean per-gate counts of the next acquisition (no shot noise), shape (n_gates,)."""
        if self._compiled is None:
            raise NvmriError("no pulse program loaded")
        c, inst = self._compiled, self.instrument
        apex = self.apex()
        bias = inst.b0_vector + self._field_jump(self.acquisitions)
        f_plus, f_minus = self._nv_lines(apex, bias)
        drive = self.mw.freq_hz + c.mw_detuning
        f_nv = np.where(np.abs(drive - f_plus) <= np.abs(drive - abs(f_minus)),
                        f_plus, abs(f_minus))
        delta = f_nv - drive
        cw = physics.cw_counts(drive if self.mw.on else np.inf, f_nv, self.shots, c.window,
                               inst.cw_count_rate_hz, inst.tau_cw_s, inst.contrast_cw)
        if not self.mw.on:
            return np.where(c.kind == _CW, cw, physics.expected_counts(
                1.0, self.shots, inst.photons_per_shot, inst.contrast))
        rabi = physics.rabi_from_power(self.mw.power_dbm, MW_RABI_HZ, MW_REF_POWER_DBM)
        amp = physics.rabi_amplitude(delta, rabi)
        coherence = self._echo.copy()
        if len(c.deer):
            coherence[c.deer] = self._deer_coherences(apex, bias)
        echo_p0 = 1.0 - amp * (1.0 - physics.p0_from_coherence(coherence))
        p0 = np.choose(c.kind, [1.0, 1.0,   # CW (unused), bright
                                1.0 - physics.rabi_flip_probability(delta, rabi, c.mw_duration),
                                1.0 - amp * (1.0 - physics.ramsey_p0(c.tau, delta,
                                                                     inst.nv_t2_star_s)),
                                echo_p0, echo_p0])
        pulsed = physics.expected_counts(p0, self.shots, inst.photons_per_shot, inst.contrast)
        return np.where(c.kind == _CW, cw, pulsed)

    def _nv_lines(self, apex: NDArray, bias: NDArray) -> tuple[NDArray, NDArray]:
        """(f+, f-) of the NV with the tip at ``apex`` in the field ``bias``, Hz (cached)."""
        key = apex.tobytes() + bias.tobytes()
        if self._lines is None or self._lines[0] != key:
            inst = self.instrument
            b_nv = bias + physics.tip_field(inst.nv_position_nm, apex, inst.tip_radius_nm,
                                            inst.tip_moment_am2)
            self._lines = key, physics.nv_transition_frequencies(b_nv, inst.nv_axis)
        return self._lines[1]

    def _deer_coherences(self, apex: NDArray, bias: NDArray) -> NDArray:
        """DEER coherence of every DEER gate of the program (cached per tip, field and RF)."""
        key = (apex.tobytes(), bias.tobytes(), self.rf.on, self.rf.freq_hz)
        if self._deer_cache is None or self._deer_cache[0] != key:
            c = self._compiled
            f_j = self._dark_frequencies(apex, bias)
            values = np.array([self._deer(c.tau[i], c.rf_detuning[i], c.rf_duration[i], f_j)
                               for i in c.deer])
            self._deer_cache = key, values
        return self._deer_cache[1]

    def _dark_frequencies(self, apex: NDArray, bias: NDArray) -> NDArray | None:
        """Dark-spin resonances f_j with the tip at ``apex``, Hz; None if no spin is driven."""
        inst = self.instrument
        if not self.rf.on or len(self.spins) == 0:
            return None
        b = bias + physics.tip_field(self.spins, apex, inst.tip_radius_nm, inst.tip_moment_am2)
        return physics.dark_spin_frequency(b)

    def _deer(self, tau: float, rf_detuning: float, rf_duration: float,
              f_j: NDArray | None) -> float:
        """DEER coherence S of one gate, the dark spins at ``f_j`` (None: RF off or none)."""
        inst = self.instrument
        if f_j is None:
            return float(physics.echo_coherence(tau, inst.nv_t2_s, inst.nv_t2_exponent))
        p = physics.dark_flip_probability(self.rf.freq_hz + rf_detuning - f_j, rf_duration,
                                          inst.dark_t2_star_s)
        return float(physics.deer_coherence(tau, p, self.couplings, inst.nv_t2_s,
                                            inst.nv_t2_exponent))

    def acquire(self) -> NDArray:
        """One acquisition: every gate for ``shots`` shots.

        Returns
        -------
        ndarray, shape (n_gates,)
            Poisson counts per gate (float), in the program's gate order.
        """
        mean = self.expected_counts()
        index = self.acquisitions
        dropout = any(f.kind == "counter_dropout"
                      and f.after_acquisitions <= index < f.after_acquisitions + f.count
                      for f in self.scenario.faults)
        counts = (np.zeros_like(mean) if dropout or not self.laser_on
                  else self.rng.poisson(mean).astype(float))
        self.time_s += self.acquisition_time()
        self.acquisitions += 1
        return counts
