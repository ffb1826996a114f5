"""Channel Access plumbing shared by the devices.

* :func:`call_later`: watchdogs (a readback or counts that should have
  arrived by now) on one daemon thread, not a thread per put.
* :func:`put_flush_only`: a pyepics put that is flushed, not followed by a
  sleep, on the thread inside the block.
* :func:`watch_disconnect`, :func:`put_checked`, :func:`lost_connection`: a
  PV whose IOC goes away fails the pending status with one clear line.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from nvmri_bluesky.errors import NvmriError

__all__ = ["call_later", "put_flush_only", "watch_disconnect", "subscribe_disconnect",
           "lost_connection", "put_checked"]

logger = logging.getLogger(__name__)


class _Deadlines:
    """Run callbacks at deadlines on one daemon thread.

    The devices arm a watchdog (a readback or counts that should have arrived
    by now) on every put; a ``threading.Timer`` would start a thread per put
    (about 0.1-0.7 ms, on the thread that completes the status).  Entries are
    cancelled lazily: the callback is dropped, the entry expires unnoticed.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> list[Any]:
        entry = [time.monotonic() + delay, next(self._seq), fn]
        with self._cv:
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="nvmri-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cv.notify()
        return entry

    def _next(self) -> Callable[[], None]:
        with self._cv:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay <= 0:
                    fn = heapq.heappop(self._heap)[2]
                    if fn is not None:
                        return fn
                    continue
                self._cv.wait(delay)

    def _run(self) -> None:
        while True:
            fn = self._next()
            try:
                fn()
            except Exception:  # noqa: BLE001 - a watchdog must not die
                logger.exception("deadline callback %r failed", fn)


_deadlines = _Deadlines()


def call_later(delay: float, fn: Callable[[], None]) -> Callable[[], None]:
    """Call ``fn()`` on the shared watchdog thread after ``delay`` s; return a cancel function."""
    entry = _deadlines.call_later(delay, fn)

    def cancel() -> None:
        entry[2] = None

    return cancel


_flush = threading.local()


def _install_put_flush() -> bool:
    """Let :func:`put_flush_only` change how pyepics ends a put (pyepics control layer only).

    ``epics.ca.put`` queues the request and then calls ``ca.poll()``, i.e.
    ``ca_pend_event(1e-4 s)`` (1e-5 s without a callback) and ``ca_pend_io``:
    with preemptive callbacks that is a flush plus a sleep, 0.1-0.7 ms on the
    calling thread (the RunEngine's) per put on a loaded machine.  The
    replacement only flushes (``ca_flush_io``), and only on a thread inside
    :func:`put_flush_only`; everywhere else ``ca.poll`` is unchanged.
    """
    try:
        import ophyd
        if getattr(ophyd.cl, "name", "") != "pyepics":
            return False
        from epics import ca
    except Exception:  # noqa: BLE001 - another control layer: nothing to do
        return False
    if getattr(ca.poll, "_nvmri_flush", False):
        return True
    original = ca.poll

    def poll(evt: float = 1.0e-5, iot: float = 1.0) -> Any:
        if getattr(_flush, "only", False):
            return ca.flush_io()
        return original(evt=evt, iot=iot)

    poll._nvmri_flush = True  # type: ignore[attr-defined]
    poll.__doc__ = original.__doc__
    ca.poll = poll
    return True


_PUT_FLUSH = _install_put_flush()


@contextlib.contextmanager
def put_flush_only() -> Iterator[None]:
    """Within this block, a pyepics put on this thread is flushed, not followed by a sleep.

    The put itself (and its put-completion callback) is unchanged; see
    :func:`_install_put_flush`.
    """
    if not _PUT_FLUSH or getattr(_flush, "only", False):
        yield
        return
    _flush.only = True
    try:
        yield
    finally:
        _flush.only = False


def watch_disconnect(signal: Any, status: Any, what: str) -> None:
    """Fail ``status`` with :class:`NvmriError` if ``signal`` disconnects before it is done.

    Without this a put-completion or a motor move whose IOC dies never
    completes; with it the plan gets one clear line at once.
    """
    cid = subscribe_disconnect(signal, status, what)
    status.add_callback(lambda _st: signal.unsubscribe(cid))


def lost_connection(pvname: str, what: str) -> NvmriError:
    """The one-line error of a PV whose IOC went away during ``what``."""
    return NvmriError(f"lost the connection to {pvname} during {what} "
                      "(IOC stopped or unreachable)")


def put_checked(signal: Any, status: Any, what: str, value: Any, **kwargs: Any) -> None:
    """``signal.put(value, **kwargs)``; a failure fails ``status`` too and is raised.

    A PV that is already disconnected when the put starts makes ophyd wait
    for it and raise ``TimeoutError``; that becomes :func:`lost_connection`,
    the same line as a disconnect seen while the put is pending.
    """
    try:
        signal.put(value, **kwargs)
    except Exception as exc:
        error = (lost_connection(signal.pvname, what)
                 if isinstance(exc, TimeoutError) and not signal.connected else exc)
        if not status.done:
            status.set_exception(error)
        if error is exc:
            raise
        raise error from exc


def subscribe_disconnect(signal: Any, status: Any, what: str) -> int:
    """:func:`watch_disconnect` without the clean-up: return the subscription id."""
    def on_meta(*, connected: bool = True, **_: Any) -> None:
        if not connected and not status.done:
            try:
                status.set_exception(lost_connection(signal.pvname, what))
            except Exception:  # noqa: BLE001 - finished meanwhile: nothing to fail
                pass

    return signal.subscribe(on_meta, event_type=signal.SUB_META, run=False)
