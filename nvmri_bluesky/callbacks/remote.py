"""Live resonant slices in another process, from documents published over 0MQ.

A RunEngine publishes its documents with ``bluesky.callbacks.zmq.Publisher``
(the profile does when ``NVMRI_ZMQ=host:port`` names a proxy's input); a
``bluesky-0MQ-proxy`` fans them out; :func:`run_live` (``nvmri live``)
subscribes to the proxy's output with ``RemoteDispatcher`` and draws each
raster with its own :class:`~nvmri_bluesky.callbacks.LiveSlices` (runs from
several RunEngines may interleave), writing ``<plan>_<uid8>.png`` under
``out_dir`` when a run stops.  It prints one line per run start and stop
(with the number of events received) and returns after ``max_runs`` stop
documents, or runs until interrupted.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from event_model import RunRouter

__all__ = ["RunSummary", "LiveSummary", "LiveCounter", "run_live"]


@dataclass
class RunSummary:
    """What arrived of one run.

    Attributes
    ----------
    uid : str
    plan_name : str
    events : int
        Event documents received (an event page counts its rows).
    exit_status : str or None
        From the stop document; None while the run is open.
    num_events : int or None
        The stop document's own count of primary-stream events.
    figures : list of str
        PNGs written for the run.
    """

    uid: str
    plan_name: str
    events: int = 0
    exit_status: str | None = None
    num_events: int | None = None
    figures: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for the terminal (``key=value`` pairs after the uid)."""
        text = (f"run {self.uid} plan={self.plan_name} events={self.events} "
                f"status={self.exit_status}")
        if self.num_events is not None:
            text += f" num_events={self.num_events}"
        return text + "".join(f" figure={f}" for f in self.figures)


@dataclass
class LiveSummary:
    """Every run :func:`run_live` saw, in the order they started."""

    runs: list[RunSummary] = field(default_factory=list)

    @property
    def events(self) -> int:
        """Events received over all runs."""
        return sum(r.events for r in self.runs)

    @property
    def stopped(self) -> int:
        """Runs whose stop document arrived."""
        return sum(r.exit_status is not None for r in self.runs)


class LiveCounter:
    """A document callback that counts each run's events and reports starts and stops.

    Parameters
    ----------
    summary : LiveSummary
        Filled in as documents arrive.
    stream : file, optional
        Where the lines go (default stdout).
    figures_of : callable, optional
        ``uid -> list of PNG paths`` written for the run so far.
    on_stop : callable, optional
        Called with the run's summary after each stop document.
    """

    def __init__(self, summary: LiveSummary, stream: IO[str] | None = None,
                 figures_of: Callable[[str], list[str]] | None = None,
                 on_stop: Callable[[RunSummary], None] | None = None) -> None:
        self.summary = summary
        self.stream = stream or sys.stdout
        self.figures_of = figures_of
        self.on_stop = on_stop
        self._runs: dict[str, RunSummary] = {}
        self._descriptors: dict[str, str] = {}

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            run = RunSummary(uid=doc["uid"], plan_name=str(doc.get("plan_name", "")))
            self._runs[run.uid] = run
            self.summary.runs.append(run)
            self.say(f"start {run.uid} plan={run.plan_name}")
        elif name == "descriptor":
            self._descriptors[doc["uid"]] = doc["run_start"]
        elif name in ("event", "event_page"):
            run = self._runs.get(self._descriptors.get(doc["descriptor"], ""))
            if run is not None:
                run.events += len(doc["seq_num"]) if name == "event_page" else 1
        elif name == "stop":
            run = self._runs.pop(doc["run_start"], None)
            if run is None:
                return
            self._descriptors = {k: v for k, v in self._descriptors.items() if v != run.uid}
            run.exit_status = str(doc.get("exit_status"))
            num = doc.get("num_events") or {}
            run.num_events = num.get("primary") if "primary" in num else None
            if self.figures_of is not None:
                run.figures = self.figures_of(run.uid)
            self.say(run.line())
            if self.on_stop is not None:
                self.on_stop(run)

    def say(self, text: str) -> None:
        """Write ``nvmri live: <text>`` as one line."""
        self.stream.write(f"nvmri live: {text}\n")
        self.stream.flush()


def _use_headless_backend() -> None:
    """Agg unless a display and an interactive backend were asked for."""
    import matplotlib

    if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")


def run_live(address: str, out_dir: str | Path = ".", max_runs: int | None = None, *,
             stream: IO[str] | None = None) -> LiveSummary:
    """Draw live slices of the runs published through a 0MQ proxy.

    Parameters
    ----------
    address : str
        The proxy's output, ``host:port`` (``bluesky-0MQ-proxy --out-address``).
    out_dir : path
        Where each raster's ``<plan>_<uid8>.png`` is written when it stops.
    max_runs : int, optional
        Return after this many stop documents (default: run until interrupted).
    stream : file, optional
        Where progress lines go (default stdout).

    Returns
    -------
    LiveSummary
        The runs seen and the events received of each.

    Raises
    ------
    NvmriError
        Invalid address or ``max_runs``.
    """
    from bluesky.callbacks.zmq import RemoteDispatcher

    from nvmri_bluesky.callbacks.slices import LiveSlices
    from nvmri_bluesky.errors import NvmriError

    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit():
        raise NvmriError(f"live: address must be host:port, got {address!r}")
    if max_runs is not None and max_runs < 1:
        raise NvmriError(f"live: max_runs must be >= 1, got {max_runs!r}")
    _use_headless_backend()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream = stream or sys.stdout

    slices_of: dict[str, LiveSlices] = {}

    def factory(name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        slices = LiveSlices(out_dir=out)
        slices_of[start["uid"]] = slices
        return [slices], []

    def figures_of(uid: str) -> list[str]:
        slices = slices_of.pop(uid, None)
        return [str(p) for p in slices.saved] if slices is not None else []

    dispatcher = RemoteDispatcher(address)
    summary = LiveSummary()

    def on_stop(run: RunSummary) -> None:
        if max_runs is not None and summary.stopped >= max_runs:
            # Let the callbacks of this document finish, then end the receive loop.
            dispatcher.loop.call_soon(_cancel, dispatcher)

    counter = LiveCounter(summary, stream=stream, figures_of=figures_of, on_stop=on_stop)
    # The router first: a stop document is drawn and saved before it is counted.
    dispatcher.subscribe(RunRouter([factory]))
    dispatcher.subscribe(counter)
    dispatcher.loop.call_soon(
        lambda: counter.say(f"listening on {dispatcher.address} (figures in {out})"))
    try:
        dispatcher.start()
    except asyncio.CancelledError:
        pass
    return summary


def _cancel(dispatcher: Any) -> None:
    task = getattr(dispatcher, "_task", None)
    if task is not None:
        task.cancel()
