"""The photon counter: per-gate counts of one acquisition of the loaded pulse program.

``trigger()`` puts ``PG:ACQUIRE`` = 1 with put-completion: one trigger is
one acquisition of every gate of the loaded program for ``PG:SHOTS`` shots.
``CNT:COUNTS`` and ``CNT:ACQ_ID`` are monitored, and the trigger's status
completes only when the put has completed *and* both monitors have delivered
this acquisition (the id went up, new counts arrived), so ``read()`` right
after is served from the monitor cache, fresh, with no further CA round trip.
(A CA server may send a put's completion before monitors posted during the
put: caproto batches subscription updates on another task.)

Data keys: ``counter_counts`` (array, one number per gate in ``PG:GATES``
order, units "counts") and ``counter_acq_id`` (the IOC's acquisition number);
configuration ``counter_gates`` (JSON list) and ``counter_shots``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal
from ophyd.status import Status, StatusBase

from nvmri_bluesky.devices.ca_plumbing import (
    call_later,
    lost_connection,
    put_checked,
    put_flush_only,
    subscribe_disconnect,
)
from nvmri_bluesky.devices.signals import ConciseRepr, EpicsSignalROU, WaveformSignalRO
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.timeouts import timeout_s

__all__ = ["PhotonCounter"]

_GRACE_S = 0.2
"""After the acquire put completed, how long to wait for the counts before asking why not, s."""
SILENT_S = 5.0
"""An acquisition not done after this long (beyond its own length) is reported, s."""

logger = logging.getLogger(__name__)


class PhotonCounter(ConciseRepr, Device):
    """Counter ``<prefix>CNT:COUNTS`` / ``CNT:ACQ_ID``, armed by ``<prefix>PG:ACQUIRE``.

    Build it as ``PhotonCounter("NVMRI:", name="counter")``.

    Attributes
    ----------
    acquire_timeout : float or None
        Longest acquisition, s (None: no limit; a dropped IOC still fails
        the trigger at once).
    fresh_timeout : float
        How long after the acquire put completed the counts monitor may
        take to arrive, s (a fifth of :func:`~nvmri_bluesky.timeouts.timeout_s`;
        the IOC sends them before the completion, so this only matters when
        something is wrong).
    """

    counts = Cpt(WaveformSignalRO, "CNT:COUNTS", auto_monitor=True, kind="normal",
                 units="counts", dims=("gate",))
    acq_id = Cpt(EpicsSignalROU, "CNT:ACQ_ID", auto_monitor=True, kind="normal", units="")
    acquire = Cpt(EpicsSignal, "PG:ACQUIRE", put_complete=True, kind="omitted")
    gates = Cpt(EpicsSignalROU, "PG:GATES", string=True, kind="config", units="")
    shots = Cpt(EpicsSignalROU, "PG:SHOTS", kind="config", units="shots")
    state = Cpt(EpicsSignalROU, "PG:STATUS", string=True, kind="omitted", units="")
    message = Cpt(EpicsSignalROU, "PG:MESSAGE", string=True, kind="omitted", units="")

    def __init__(self, prefix: str = "", *, name: str, **kwargs: Any):
        super().__init__(prefix, name=name, **kwargs)
        self.acquire_timeout: float | None = None
        self.fresh_timeout: float = timeout_s(0.2)
        self.expected_s: float = 0.0
        """Wall time an acquisition is expected to take, s (added to ``SILENT_S``)."""

    def trigger(self) -> StatusBase:
        """Acquire once; the status completes when fresh counts are in the monitor cache.

        Raises
        ------
        NvmriError
            If the counter is not connected (IOC stopped or unreachable).
        """
        missing = [s.pvname for s in (self.acquire, self.counts, self.acq_id)
                   if not s.connected]
        if missing:
            raise lost_connection(", ".join(missing), "the trigger of the counter")
        return _Acquisition(self, Status(self, timeout=self.acquire_timeout)).start()

    def describe(self) -> dict[str, dict[str, Any]]:
        """Data keys; ``counter_counts`` has shape (number of gates of the loaded program,)."""
        described = super().describe()
        key = self.counts.name
        if key in described:
            try:
                n = len(self.gate_names())
            except Exception:  # noqa: BLE001 - no readable program: keep the waveform's length
                n = 0
            if n:
                described[key]["shape"] = [n]
        return described

    def gate_names(self) -> list[str]:
        """Gate names of the loaded program (``PG:GATES``), the order of ``counts``."""
        text = str(self.gates.get(use_monitor=False) or "").strip()
        return [str(n) for n in json.loads(text)] if text else []


class _Acquisition:
    """One acquisition of a :class:`PhotonCounter`: its status and its watchdogs.

    The status completes when the acquire put has completed *and* both the
    counts and the acquisition id have updated; it fails with one line if the
    IOC refused the acquisition, if the counts never came, or if the acquire
    PV disconnected.  An acquisition silent for ``SILENT_S`` beyond its
    expected length is logged (and still waited for).
    """

    def __init__(self, counter: PhotonCounter, status: Status) -> None:
        self.counter, self.status = counter, status
        self.start_id = counter.acq_id.get()
        self.lock = threading.Lock()
        self.seen = {"put": False, "counts": False, "id": False}
        self.cancels: list[Callable[[], None]] = []
        self.patience = SILENT_S + counter.expected_s

    def start(self) -> Status:
        """Subscribe, arm the watchdogs, put the acquire; return the status."""
        c, status = self.counter, self.status
        cids = [(c.counts, c.counts.subscribe(self.on_counts, run=False)),
                (c.acq_id, c.acq_id.subscribe(self.on_id, run=False)),
                (c.acquire, subscribe_disconnect(c.acquire, status, "the acquisition"))]
        self.cancels.append(call_later(self.patience, self.silent))

        def cleanup(_st: StatusBase) -> None:
            for sig, cid in cids:
                sig.unsubscribe(cid)
            for cancel in self.cancels:
                cancel()

        status.add_callback(cleanup)
        with put_flush_only():
            put_checked(c.acquire, status, "the acquisition", 1,
                        use_complete=True, callback=self.on_put)
        return status

    def finish(self) -> None:
        with self.lock:
            if self.status.done or not all(self.seen.values()):
                return
            for cancel in self.cancels:
                cancel()
            self.status.set_finished()

    def on_counts(self, **_: Any) -> None:
        self.seen["counts"] = True
        self.finish()

    def on_id(self, *, value: Any = None, **_: Any) -> None:
        if value is not None and value != self.start_id:
            self.seen["id"] = True
            self.finish()

    def fail(self, error: NvmriError) -> None:
        with self.lock:
            if not self.status.done:
                self.status.set_exception(error)

    def stale(self) -> None:
        if self.status.done:
            return
        c = self.counter
        missing = [s.pvname for s, key in ((c.counts, "counts"), (c.acq_id, "id"))
                   if not self.seen[key]]
        self.fail(NvmriError(
            f"counter: the acquisition completed but {' and '.join(missing)} did not "
            f"update within {c.fresh_timeout:g} s (acquisition id {self.start_id})"))

    def refused(self) -> None:
        # the put completed a while ago without new data: did the IOC refuse it?
        if self.status.done:
            return
        c = self.counter
        try:
            if str(c.state.get(use_monitor=False)) == "Error":
                self.fail(NvmriError("counter: the IOC refused the acquisition: "
                                     f"{c.message.get(use_monitor=False)}"))
                return
        except Exception:  # noqa: BLE001 - unreadable: let the freshness timer decide
            pass
        if not self.status.done:
            self.cancels.append(call_later(max(c.fresh_timeout - _GRACE_S, 0.0), self.stale))

    def on_put(self, **_: Any) -> None:
        self.seen["put"] = True
        if not (self.seen["counts"] and self.seen["id"]):
            # the IOC sends the counts before the completion; look closer only if not
            # (on a thread of its own: ``refused`` makes blocking CA gets)
            self.cancels.append(call_later(_GRACE_S, lambda: threading.Thread(
                target=self.refused, name="counter-refused", daemon=True).start()))
        self.finish()

    def silent(self) -> None:
        if not self.status.done:
            logger.warning("counter: acquisition %s of %s has not completed after %.3g s: "
                           "the IOC is slow or not answering; still waiting",
                           self.start_id + 1 if isinstance(self.start_id, int) else "?",
                           self.counter.prefix, self.patience)
