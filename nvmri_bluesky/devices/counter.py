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

from nvmri_bluesky.devices.signals import (
    ConciseRepr,
    EpicsSignalROU,
    WaveformSignalRO,
    _put_checked,
    _watch_disconnect,
    call_later,
    lost_connection,
    put_flush_only,
)
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
        status = Status(self, timeout=self.acquire_timeout)
        start_id = self.acq_id.get()
        lock = threading.Lock()
        seen = {"put": False, "counts": False, "id": False}
        cancels: list[Callable[[], None]] = []

        def finish() -> None:
            with lock:
                if status.done or not all(seen.values()):
                    return
                for cancel in cancels:
                    cancel()
                status.set_finished()

        def on_counts(**_: Any) -> None:
            seen["counts"] = True
            finish()

        def on_id(*, value: Any = None, **_: Any) -> None:
            if value is not None and value != start_id:
                seen["id"] = True
                finish()

        def fail(error: NvmriError) -> None:
            with lock:
                if not status.done:
                    status.set_exception(error)

        def stale() -> None:
            if status.done:
                return
            missing = [s.pvname for s, key in ((self.counts, "counts"), (self.acq_id, "id"))
                       if not seen[key]]
            fail(NvmriError(
                f"counter: the acquisition completed but {' and '.join(missing)} did not "
                f"update within {self.fresh_timeout:g} s (acquisition id {start_id})"))

        def refused() -> None:
            # the put completed a while ago without new data: did the IOC refuse it?
            if status.done:
                return
            try:
                if str(self.state.get(use_monitor=False)) == "Error":
                    fail(NvmriError("counter: the IOC refused the acquisition: "
                                    f"{self.message.get(use_monitor=False)}"))
                    return
            except Exception:  # noqa: BLE001 - unreadable: let the freshness timer decide
                pass
            if not status.done:
                cancels.append(call_later(max(self.fresh_timeout - _GRACE_S, 0.0), stale))

        def on_put(**_: Any) -> None:
            seen["put"] = True
            if not (seen["counts"] and seen["id"]):
                # the IOC sends the counts before the completion; look closer only if not
                # (on a thread of its own: ``refused`` makes blocking CA gets)
                cancels.append(call_later(_GRACE_S, lambda: threading.Thread(
                    target=refused, name="counter-refused", daemon=True).start()))
            finish()

        cids = [(self.counts, self.counts.subscribe(on_counts, run=False)),
                (self.acq_id, self.acq_id.subscribe(on_id, run=False)),
                (self.acquire, _watch_disconnect(self.acquire, status, "the acquisition"))]

        def silent() -> None:
            if not status.done:
                logger.warning("counter: acquisition %s of %s has not completed after %.3g s: "
                               "the IOC is slow or not answering; still waiting", start_id + 1
                               if isinstance(start_id, int) else "?", self.prefix, patience)

        patience = SILENT_S + self.expected_s
        cancels.append(call_later(patience, silent))

        def cleanup(_st: StatusBase) -> None:
            for sig, cid in cids:
                sig.unsubscribe(cid)
            for cancel in cancels:
                cancel()

        status.add_callback(cleanup)
        with put_flush_only():
            _put_checked(self.acquire, status, "the acquisition", 1,
                         use_complete=True, callback=on_put)
        return status

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
