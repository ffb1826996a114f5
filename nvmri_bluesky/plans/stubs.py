"""Plan stubs: the small steps every measurement is made of.

Each is a generator of bluesky messages with one purpose, in the style of
``bluesky.plan_stubs``; none opens a run.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import Msg, short_uid
from ophyd import Signal

from nvmri_bluesky import pulses
from nvmri_bluesky.errors import NvmriError


class UnitSignal(Signal):
    """A soft signal (a plan-side derived reading) whose description carries units."""

    def __init__(self, *args: Any, units: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.units = units

    def describe(self) -> dict:
        desc = super().describe()
        desc[self.name]["units"] = self.units
        return desc


def load_program(pulser: Any, program: pulses.Program) -> Generator[Any, Any, None]:
    """Load a pulse program into the pulser; raise with the IOC's reason if refused.

    Parameters
    ----------
    pulser
        Pulser device (``program``, ``message`` signals).
    program : Program
        A validated pulse program.

    Yields
    ------
    Msg
    """
    yield from bps.abs_set(pulser.program, program.to_json(), wait=True)
    message = yield from bps.rd(pulser.message)
    if message not in ("OK", "", None):
        raise NvmriError(f"pulser refused program {program.name!r}: {message}")


# The per-point stubs below yield bare ``Msg`` objects, as bluesky.plan_stubs
# does inside: its public stubs are wrapped by ``@plan``, whose bookkeeping
# (a captured call stack per call) costs a raster ~15 % of its client time.

def set_frequency(source: Any, frequency_hz: float) -> Generator[Any, Any, None]:
    """Set a source's carrier (Hz) and wait for the put to complete.

    Yields
    ------
    Msg
    """
    group = short_uid("tune")
    yield Msg("set", source.frequency, float(frequency_hz), group=group)
    yield Msg("wait", None, group=group)


def acquire(counter: Any) -> Generator[Any, Any, np.ndarray]:
    """Trigger one acquisition of every gate and return the counts (no event).

    Yields
    ------
    Msg

    Returns
    -------
    ndarray
        Counts per gate, in the loaded program's gate order.
    """
    group = short_uid("acquire")
    yield Msg("trigger", counter, group=group)
    yield Msg("wait", None, group=group)
    reading = yield Msg("read", counter.counts)
    return np.asarray(reading[counter.counts.name]["value"] if reading else (), float)


def move_and_tune(step: dict, pos_cache: dict, source: Any, frequency_hz: float
                  ) -> Generator[Any, Any, None]:
    """Checkpoint, then move to ``step`` and set the source's carrier together.

    A ``per_step`` building block like :func:`bluesky.plan_stubs.move_per_step`:
    the stage and the source settle in parallel, with one wait for both.

    Parameters
    ----------
    step : dict
        Motor -> position of this step.
    pos_cache : dict
        Motor -> last set position (updated).
    source
        The source to tune (``frequency`` signal).
    frequency_hz : float
        Its carrier at this step, Hz.

    Yields
    ------
    Msg
    """
    yield Msg("checkpoint")
    group = short_uid("step")
    for motor, pos in step.items():
        if pos != pos_cache[motor]:
            yield Msg("set", motor, pos, group=group)
            pos_cache[motor] = pos
    yield Msg("set", source.frequency, float(frequency_hz), group=group)
    yield Msg("wait", None, group=group)


def record(objects: Any, stream: str = "primary") -> Generator[Any, Any, None]:
    """Read ``objects`` (already triggered) into one event of ``stream``.

    Yields
    ------
    Msg
    """
    yield Msg("create", name=stream)
    for obj in objects:
        yield Msg("read", obj)
    yield Msg("save")


def prepare(devices: Any, program: pulses.Program, shots: int, *, mw_on: bool = True,
            rf_on: bool = False) -> Generator[Any, Any, None]:
    """Load ``program``, set the shots and switch the sources on or off."""
    yield from load_program(devices.pulser, program)
    yield from bps.mv(devices.pulser.shots, int(shots))
    yield from bps.mv(devices.mw.output, int(mw_on), devices.rf.output, int(rf_on))


def read_soft(*signals: Any) -> Generator[Any, Any, None]:
    """Read plan-side soft devices (lock, DEER analysis) into the open event."""
    for sig in signals:
        yield from bps.read(sig)


def retract(stage: Any, height_nm: float | None = None) -> Generator[Any, Any, None]:
    """Move the tip up, out of the way (default: the Z high limit)."""
    lo, hi = stage.z.limits
    yield from bps.mv(stage.z, hi if height_nm is None else height_nm)
