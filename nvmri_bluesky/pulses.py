"""Pulse programs as data: pulses, gates, programs, their JSON form and builders.

A :class:`Program` is what the pulser's ``PG:PROGRAM`` PV holds (JSON, times
in s, frequencies in Hz; see ``docs/architecture.md``).  Each :class:`Gate` is
one shot sequence, repeated ``PG:SHOTS`` times per acquisition, and gives one
number of the counter's waveform, in gate order.

Channels: ``laser``, ``mw``, ``rf``, ``counter``.  ``detuning`` on ``mw`` and
``rf`` pulses is an IQ sideband relative to the source's carrier (Hz);
``phase`` is the pulse phase in degrees (recorded for a real AWG; the
simulator does not use it).

Builders return validated programs.  Every pulsed gate has the same frame:
``laser_init`` of laser, ``wait`` in the dark, the MW/RF sequence, then a
``readout`` laser pulse with the ``window`` counter at its start.  MW pulse
lengths come from the NV Rabi frequency: pi/2 = 1/(4 rabi), pi = 1/(2 rabi).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

from pydantic import BeforeValidator, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.physics import MW_RABI_HZ
from nvmri_bluesky.schema import CONFIG, Real, dotted, first_error, problem, sequence

__all__ = [
    "CHANNELS", "MW_RABI_HZ", "LASER_INIT_S", "WAIT_S", "READOUT_S", "WINDOW_S",
    "CW_WINDOW_S", "Pulse", "Gate", "Program", "cw_odmr", "odmr_comb", "frequency_lock",
    "rabi", "ramsey", "echo", "deer",
]

CHANNELS = ("laser", "mw", "rf", "counter")
LASER_INIT_S = 3e-6
"""Initialising laser pulse, s."""
WAIT_S = 1e-6
"""Dark wait after the initialising pulse (the NV relaxes to ms = 0), s."""
READOUT_S = 3e-6
"""Readout laser pulse, s."""
WINDOW_S = 300e-9
"""Counter window at the start of a pulsed readout, s."""
CW_WINDOW_S = 3e-6
"""Counter window (and laser/MW pulse) of a CW-ODMR gate, s."""

_EPS = 1e-15  # s; tolerance when comparing pulse edges


def _word(value: Any) -> str:
    if not isinstance(value, str):
        raise problem(f"expected a string, got {value!r}")
    return value


_Word = Annotated[str, BeforeValidator(_word)]


@dataclass(config=CONFIG)
class Pulse:
    """One pulse on one channel.

    Parameters
    ----------
    channel : str
        ``"laser"``, ``"mw"``, ``"rf"`` or ``"counter"``.
    start, duration : float
        Start from the gate's beginning and length, s.
    detuning : float
        IQ sideband relative to the source's carrier, Hz (``mw`` and ``rf``).
    phase : float
        Pulse phase, degrees (``mw`` and ``rf``).
    """

    channel: _Word
    start: Real
    duration: Real
    detuning: Real = 0.0
    phase: Real = 0.0

    @property
    def stop(self) -> float:
        """End of the pulse, s."""
        return self.start + self.duration

    def overlaps(self, other: Pulse) -> bool:
        """True when the two pulses share a time interval of non-zero length."""
        return self.start < other.stop - _EPS and other.start < self.stop - _EPS

    def contains(self, other: Pulse) -> bool:
        """True when ``other`` lies within this pulse (edges included)."""
        return self.start - _EPS <= other.start and other.stop <= self.stop + _EPS

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"channel": self.channel, "start": self.start,
                             "duration": self.duration}
        if self.channel in ("mw", "rf"):
            d.update(detuning=self.detuning, phase=self.phase)
        return d


@dataclass(config=CONFIG)
class Gate:
    """One shot sequence whose counter window gives one number per acquisition.

    Construction checks the types only (a program's JSON is parsed into
    these); :meth:`validate` checks that the gate can run.
    """

    name: _Word
    pulses: Annotated[tuple[Pulse, ...], sequence(what=" of pulses")]

    def on(self, channel: str) -> tuple[Pulse, ...]:
        """Pulses on ``channel``, sorted by start."""
        return tuple(sorted((p for p in self.pulses if p.channel == channel),
                            key=lambda p: p.start))

    @property
    def counter(self) -> Pulse:
        """The gate's counter window (the gate must be valid)."""
        return self.on("counter")[0]

    @property
    def readout(self) -> Pulse:
        """The laser pulse that contains the counter window (the gate must be valid)."""
        window = self.counter
        return next(p for p in self.on("laser") if p.contains(window))

    @property
    def duration(self) -> float:
        """Length of one shot, s."""
        return max((p.stop for p in self.pulses), default=0.0)

    def validate(self) -> None:
        """Raise :class:`NvmriError` (one line) if the gate is not well formed."""
        where = f"gate {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise NvmriError(f"gate name must be a non-empty string, got {self.name!r}")
        for i, p in enumerate(self.pulses):
            at = f"{where} pulse {i}"
            if p.channel not in CHANNELS:
                raise NvmriError(f"{at}: unknown channel {p.channel!r} "
                                 f"(known: {', '.join(CHANNELS)})")
            for key in ("start", "duration", "detuning", "phase"):
                if not math.isfinite(getattr(p, key)):
                    raise NvmriError(f"{at}: {key} must be finite, got {getattr(p, key)!r}")
            if p.duration <= 0:
                raise NvmriError(f"{at} ({p.channel}): duration must be > 0 s, got {p.duration}")
            if p.start < 0:
                raise NvmriError(f"{at} ({p.channel}): start must be >= 0 s, got {p.start}")
        for channel in CHANNELS:
            on = self.on(channel)
            for a, b in zip(on, on[1:], strict=False):
                if a.overlaps(b):
                    raise NvmriError(f"{where}: overlapping {channel} pulses at "
                                     f"{a.start:.4g} s and {b.start:.4g} s")
        windows = self.on("counter")
        if len(windows) != 1:
            raise NvmriError(f"{where}: needs exactly one counter window, has {len(windows)}")
        if not any(p.contains(windows[0]) for p in self.on("laser")):
            raise NvmriError(f"{where}: the counter window is not inside a laser pulse")
        rf, mw = self.on("rf"), self.on("mw")
        if rf:
            first = mw[0].start if mw else math.inf
            last = max((p.stop for p in mw), default=-math.inf)
            for p in rf:
                if not (first - _EPS <= p.start and p.stop <= last + _EPS):
                    raise NvmriError(f"{where}: RF pulse at {p.start:.4g} s is not inside "
                                     "the echo (between the first and the last MW pulse)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pulses": [p.to_dict() for p in self.pulses]}


@dataclass(config=CONFIG)
class Program:
    """A named list of gates: one acquisition runs every gate for N shots.

    Construction checks the types only; :meth:`validate` (which
    :meth:`from_json` and the builders call) checks that it can run.
    """

    name: _Word
    gates: Annotated[tuple[Gate, ...], sequence(what=" of gates")]

    @property
    def gate_names(self) -> list[str]:
        """Gate names in count order."""
        return [g.name for g in self.gates]

    @property
    def duration(self) -> float:
        """One shot of every gate, s."""
        return sum(g.duration for g in self.gates)

    def gate(self, name: str) -> Gate:
        """The gate called ``name``."""
        for g in self.gates:
            if g.name == name:
                return g
        raise NvmriError(f"program {self.name!r} has no gate {name!r}")

    def validate(self) -> Program:
        """Raise :class:`NvmriError` (one line) if malformed; return self otherwise."""
        if not self.gates:
            raise NvmriError(f"program {self.name!r} has no gates")
        seen: set[str] = set()
        for g in self.gates:
            if g.name in seen:
                raise NvmriError(f"program {self.name!r}: duplicate gate name {g.name!r}")
            seen.add(g.name)
            g.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "gates": [g.to_dict() for g in self.gates]}

    def to_json(self) -> str:
        """Compact JSON, the form ``PG:PROGRAM`` holds."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, source: str | bytes | Mapping[str, Any]) -> Program:
        """Parse and validate a program from JSON text or from its dict form."""
        if isinstance(source, bytes | bytearray):
            source = source.decode()
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except json.JSONDecodeError as exc:
                raise NvmriError(f"pulse program is not valid JSON: {exc}") from None
        if isinstance(source, Mapping):
            source = {"name": "program", **source}
        try:
            return _DOCUMENT.validate_python(source).validate()
        except ValidationError as exc:
            raise NvmriError(_refusal(exc)) from None


_DOCUMENT = TypeAdapter(Program)


def _refusal(exc: ValidationError) -> str:
    """One line for a program document pydantic refused: where (``gates[0].pulses[1]``), why."""
    keys, kind, why, value = first_error(exc)
    if kind in ("missing", "unexpected_keyword_argument", "invalid_key"):
        where, key = dotted(keys[:-1]) or "program", keys[-1]
        return f"{where}: {'missing' if kind == 'missing' else 'unknown'} key {key!r}"
    if keys[-1:] == ("name",):
        return (f"program name must be a string, got {value!r}" if len(keys) == 1
                else f"gate name must be a non-empty string, got {value!r}")
    if kind == "dataclass_type":
        why = f"expected an object, got {type(value).__name__}"
    where = f"program.{keys[0]}" if len(keys) == 1 else dotted(keys) or "program"
    return f"{where}: {why}"


# ---------------------------------------------------------------- builders

def _frame(name: str, sequence: Sequence[Pulse], length: float) -> Gate:
    """Wrap a MW/RF ``sequence`` (times from 0, ``length`` s long) in init + readout."""
    t0 = LASER_INIT_S + WAIT_S
    shifted = tuple(Pulse(p.channel, p.start + t0, p.duration, p.detuning, p.phase)
                    for p in sequence)
    t_read = t0 + length
    return Gate(name, (Pulse("laser", 0.0, LASER_INIT_S), *shifted,
                       Pulse("laser", t_read, READOUT_S),
                       Pulse("counter", t_read, WINDOW_S)))


def _cw_gate(name: str, detuning: float, window: float) -> Gate:
    return Gate(name, (Pulse("laser", 0.0, window), Pulse("mw", 0.0, window, detuning),
                       Pulse("counter", 0.0, window)))


def _references(mw_rabi_hz: float) -> tuple[Gate, Gate]:
    """The ``bright`` (no MW) and ``dark`` (one NV pi pulse) reference gates."""
    pi = 1.0 / (2.0 * mw_rabi_hz)
    return _frame("bright", (), 0.0), _frame("dark", (Pulse("mw", 0.0, pi),), pi)


def _echo_sequence(tau: float, mw_rabi_hz: float, mw_detuning: float,
                   rf: tuple[float, float] | None = None) -> tuple[tuple[Pulse, ...], float]:
    """pi/2 - tau/2 - pi - tau/2 - pi/2, optionally with an RF pulse centred on the pi."""
    half, pi = 1.0 / (4.0 * mw_rabi_hz), 1.0 / (2.0 * mw_rabi_hz)
    t_pi = half + tau / 2
    t_last = t_pi + pi + tau / 2
    pulses = [Pulse("mw", 0.0, half, mw_detuning), Pulse("mw", t_pi, pi, mw_detuning),
              Pulse("mw", t_last, half, mw_detuning)]
    if rf is not None:
        rf_duration, rf_detuning = rf
        pulses.append(Pulse("rf", t_pi + pi / 2 - rf_duration / 2, rf_duration, rf_detuning))
    return tuple(pulses), t_last + half


def cw_odmr(detunings: Iterable[float] = (0.0,), *, window: float = CW_WINDOW_S,
            name: str = "cw_odmr") -> Program:
    """CW ODMR: one gate ``cw_<i>`` per MW sideband detuning, MW on while counting.

    Parameters
    ----------
    detunings : iterable of float
        MW sideband detunings from the carrier, Hz.
    window : float
        Laser pulse = MW pulse = counter window, s.
    """
    gates = [_cw_gate(f"cw_{i}", float(d), window) for i, d in enumerate(detunings)]
    return Program(name, tuple(gates)).validate()


def odmr_comb(detunings: Iterable[float], *, window: float = CW_WINDOW_S) -> Program:
    """A whole CW-ODMR spectrum in one acquisition: gates ``odmr_<i>`` at ``detunings`` Hz.

    Used to (re)acquire the frequency lock: one trigger returns the spectrum
    around the carrier.
    """
    gates = [_cw_gate(f"odmr_{i}", float(d), window) for i, d in enumerate(detunings)]
    return Program("odmr_comb", tuple(gates)).validate()


def frequency_lock(detunings: Iterable[float], *, window: float = CW_WINDOW_S) -> Program:
    """Only the CW lock gates ``lock_<i>`` at MW sidebands ``detunings`` Hz (no DEER).

    The same gates :func:`deer` appends, for rasters that lock without
    measuring anything else (the PSF / detuning maps).
    """
    gates = [_cw_gate(f"lock_{i}", float(d), window) for i, d in enumerate(detunings)]
    return Program("frequency_lock", tuple(gates)).validate()


def rabi(duration: float, *, detuning: float = 0.0, references: bool = True,
         mw_rabi_hz: float = MW_RABI_HZ) -> Program:
    """Rabi: one MW pulse of ``duration`` s (gate ``rabi``), plus ``bright``/``dark``."""
    gates = [_frame("rabi", (Pulse("mw", 0.0, duration, detuning),), duration)]
    if references:
        gates += _references(mw_rabi_hz)
    return Program("rabi", tuple(gates)).validate()


def ramsey(tau: float, detuning: float = 0.0, *, references: bool = True,
           mw_rabi_hz: float = MW_RABI_HZ) -> Program:
    """Ramsey: pi/2 - ``tau`` - pi/2 with the MW detuned by ``detuning`` Hz (gate ``ramsey``).

    ``tau`` is the free time between the two pulses, s.
    """
    half = 1.0 / (4.0 * mw_rabi_hz)
    seq = (Pulse("mw", 0.0, half, detuning), Pulse("mw", half + tau, half, detuning))
    gates = [_frame("ramsey", seq, tau + 2 * half)]
    if references:
        gates += _references(mw_rabi_hz)
    return Program("ramsey", tuple(gates)).validate()


def echo(tau: float, *, detuning: float = 0.0, references: bool = True,
         mw_rabi_hz: float = MW_RABI_HZ) -> Program:
    """Hahn echo pi/2 - tau/2 - pi - tau/2 - pi/2 (gate ``echo``); ``tau`` total free time, s."""
    seq, length = _echo_sequence(tau, mw_rabi_hz, detuning)
    gates = [_frame("echo", seq, length)]
    if references:
        gates += _references(mw_rabi_hz)
    return Program("echo", tuple(gates)).validate()


def deer(tau: float, *, rf_duration: float = 100e-9, rf_detuning: float = 0.0,
         references: bool = True, lock_detunings: Iterable[float] = (),
         lock_window: float = CW_WINDOW_S, mw_detuning: float = 0.0,
         mw_rabi_hz: float = MW_RABI_HZ) -> Program:
    """DEER with its references and, optionally, frequency-lock gates: one program.

    Gates, in count order: ``signal`` (echo with an RF pi pulse of
    ``rf_duration`` centred on the NV pi pulse), ``echo`` (the same without
    RF), then with ``references`` ``bright`` (no MW) and ``dark`` (one NV pi
    pulse), then one CW-ODMR gate ``lock_<i>`` per MW sideband detuning in
    ``lock_detunings``, so one trigger both measures and locks.

    Parameters
    ----------
    tau : float
        Total free-evolution time, s; must leave room for the RF pulse
        (tau >= rf_duration - pi, about).
    rf_duration : float
        RF pi-pulse length on the dark spins, s.
    rf_detuning : float
        RF sideband from the RF carrier, Hz.
    lock_detunings : iterable of float
        MW sideband detunings of the lock gates, Hz.
    lock_window : float
        Counter window of each lock gate, s.
    mw_detuning : float
        MW sideband of the echo pulses, Hz.
    """
    signal, length = _echo_sequence(tau, mw_rabi_hz, mw_detuning, (rf_duration, rf_detuning))
    plain, _ = _echo_sequence(tau, mw_rabi_hz, mw_detuning)
    gates = [_frame("signal", signal, length), _frame("echo", plain, length)]
    if references:
        gates += _references(mw_rabi_hz)
    gates += [_cw_gate(f"lock_{i}", float(d), lock_window)
              for i, d in enumerate(lock_detunings)]
    return Program("deer", tuple(gates)).validate()
