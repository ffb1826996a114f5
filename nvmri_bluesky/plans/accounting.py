"""Instrument time: what a run costs on a real instrument (not the wall time here).

A run's instrument time is the time the hardware is busy for it:

* every acquisition (one ``counter`` trigger) runs every gate of the loaded
  pulse program ``PG:SHOTS`` times, so it costs shots x
  :attr:`~nvmri_bluesky.pulses.Program.duration` (one shot of every
  gate, each gate from its first to its last pulse's end);
* every stage move costs its distance / the motor's ``.VELO``; axes moved in
  one group move together (the group costs its slowest axis).

Both are counted from what the plans command (the messages the RunEngine
processes) and the device settings (program JSON, shots, velocity): never
from the simulator.  Lock acquisitions, comb searches and re-acquisitions
count as much as recorded points: the instrument spends that time too.
Motor settling, CA latency and dead time between shots are not counted (a
real instrument's overheads; they are the wall time's business).

:func:`instrument_time_s` is the formula; :class:`InstrumentClock` applies it
to every run of a RunEngine and writes the result into each run's stop
document (``instrument_time_s`` and ``instrument_time``, a breakdown).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from nvmri_bluesky import pulses

__all__ = ["instrument_time_s", "RunTime", "InstrumentClock", "stop_instrument_time_s"]


def instrument_time_s(shots: ArrayLike = (), program_duration_s: ArrayLike = (),
                      travel_nm: ArrayLike = (), velocity_nm_per_s: ArrayLike = math.inf
                      ) -> float:
    """Instrument time of acquisitions and stage moves, s.

    sum(shots_i x program_duration_i) + sum(travel_j / velocity_j).

    Parameters
    ----------
    shots : array_like (n,)
        Shots per gate of each acquisition.
    program_duration_s : array_like (n,)
        One shot of every gate of the program loaded for that acquisition
        (:attr:`Program.duration`), s.
    travel_nm : array_like (m,)
        Length of each stage move (the slowest axis of a combined move), nm.
    velocity_nm_per_s : array_like (m,) or float
        The moving motor's ``.VELO``, nm/s.

    Returns
    -------
    float
        s.
    """
    shots_a, dur = np.asarray(shots, float), np.asarray(program_duration_s, float)
    travel = np.abs(np.asarray(travel_nm, float))
    velocity = np.broadcast_to(np.asarray(velocity_nm_per_s, float), travel.shape)
    moving = travel > 0
    return float(np.sum(shots_a * dur) + np.sum(travel[moving] / velocity[moving]))


@dataclass
class RunTime:
    """Instrument time accumulated by one run (s), and its acquisitions."""

    acquisitions: int = 0
    shots_s: float = 0.0
    travel_s: float = 0.0

    @property
    def total_s(self) -> float:
        """Shots plus stage travel, s."""
        return self.shots_s + self.travel_s

    def as_dict(self) -> dict[str, float | int]:
        """The stop document's ``instrument_time`` breakdown."""
        return {"acquisitions": self.acquisitions, "shots_s": self.shots_s,
                "travel_s": self.travel_s}


class InstrumentClock:
    """Counts every run's instrument time and writes it into its stop document.

    ``InstrumentClock(devices).attach(RE)`` hooks the RunEngine: its
    ``msg_hook`` sees every message (program loads, shot settings, counter
    triggers, stage moves) and a document callback adds
    ``instrument_time_s`` and ``instrument_time`` to each stop document.
    Attach it *before* any other subscription (catalog, spool), so that the
    stop document they receive already carries the time.

    Parameters
    ----------
    devices
        The instrument (``pulser``, ``counter``, ``stage``).
    """

    def __init__(self, devices: Any) -> None:
        self._pulser, self._counter = devices.pulser, devices.counter
        self._motors = tuple(getattr(devices.stage, axis) for axis in ("x", "y", "z"))
        self._durations: dict[str, float] = {}
        self._duration_s: float | None = None
        self._shots: float | None = None
        self._position: dict[Any, float] = {}
        self._velocity: dict[Any, float] = {}
        self._pending: dict[Any, float] = {}
        self._run: RunTime | None = None
        self._previous_hook: Any = None

    def attach(self, RE: Any) -> InstrumentClock:
        """Install on ``RE`` (chains an existing ``msg_hook``); returns self."""
        self._previous_hook = RE.msg_hook
        RE.msg_hook = self
        RE.subscribe(self.document)
        return self

    # ---------------------------------------------------------------- messages
    def __call__(self, msg: Any) -> None:
        if self._previous_hook is not None:
            self._previous_hook(msg)
        command, obj = msg.command, msg.obj
        if command == "open_run":
            self._run = RunTime()
            self._velocity.clear()
        elif command == "set" and obj is self._pulser.program:
            self._duration_s = self._program_duration(msg.args[0])
        elif command == "set" and obj is self._pulser.shots:
            self._shots = float(msg.args[0])
        elif command == "trigger" and obj is self._counter:
            self._acquired()
        elif command == "set" and obj in self._motors:
            self._moved(obj, float(msg.args[0]), msg.kwargs.get("group"))
        elif command == "wait":
            self._settle(msg.kwargs.get("group"))

    def _program_duration(self, program_json: str) -> float:
        if program_json not in self._durations:
            self._durations[program_json] = pulses.Program.from_json(program_json).duration
        return self._durations[program_json]

    def _acquired(self) -> None:
        if self._run is None:
            return
        if self._duration_s is None:                 # loaded before this clock was attached
            self._duration_s = self._program_duration(self._pulser.program.get())
        if self._shots is None:
            self._shots = float(self._pulser.shots.get())
        self._run.acquisitions += 1
        self._run.shots_s += instrument_time_s([self._shots], [self._duration_s])

    def _moved(self, motor: Any, target_nm: float, group: Any) -> None:
        start = self._position.get(motor)
        if start is None:
            start = float(motor.position)
        self._position[motor] = target_nm
        if self._run is None:
            return
        if motor not in self._velocity:
            self._velocity[motor] = float(motor.velocity.get())
        seconds = instrument_time_s(travel_nm=[target_nm - start],
                                    velocity_nm_per_s=[self._velocity[motor]])
        if group is None:
            self._run.travel_s += seconds
        else:
            self._pending[group] = max(self._pending.get(group, 0.0), seconds)

    def _settle(self, group: Any) -> None:
        seconds = self._pending.pop(group, 0.0)
        if self._run is not None:
            self._run.travel_s += seconds

    # --------------------------------------------------------------- documents
    def document(self, name: str, doc: dict) -> None:
        """Document callback: adds the run's instrument time to its stop document."""
        if name != "stop" or self._run is None:
            return
        for group in list(self._pending):
            self._settle(group)
        doc["instrument_time_s"] = self._run.total_s
        doc["instrument_time"] = self._run.as_dict()
        self._run = None


def stop_instrument_time_s(stops: Sequence[dict]) -> float | None:
    """Sum of ``instrument_time_s`` over stop documents (None if none carries it), s."""
    times = [s["instrument_time_s"] for s in stops if s and "instrument_time_s" in s]
    return float(sum(times)) if times else None
