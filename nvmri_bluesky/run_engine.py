"""The package's RunEngine: stop documents that say why a run ended, suspenders on health.

:class:`RunEngine` is bluesky's, with two fixes to what reaches the catalog:

- a plan that fails on a failed status (a move whose IOC died, a put the IOC
  refused) ends with the status's own error as the stop document's reason,
  e.g. "lost the connection to ...MW:FREQ_RBV ...", and raises it as an
  :class:`~nvmri_bluesky.errors.NvmriError` (one line), not bluesky's
  ``FailedStatus(<status repr>)``;
- ``abort(reason)`` of a paused run keeps ``reason`` (bluesky resets it when
  it resumes the plan to clean up, so "interrupted (Ctrl-C)" was lost).

:func:`install_suspenders` suspends a run while ``HEALTH:LASER_OK`` reads
Fault: bluesky rewinds the plan to its last checkpoint, so the points taken
during the fault are taken again, not kept.

Creating a :class:`RunEngine` also makes bluesky's protocol checks cheap on
Python 3.11 (:func:`remember_protocol_attributes`) and skips the tracing
attributes of messages that no tracer records (:func:`skip_unrecorded_span_attributes`).
"""

from __future__ import annotations

import sys
import typing
import weakref
from collections.abc import Callable, Generator
from typing import Any

import bluesky
from bluesky.suspenders import SuspendBoolLow
from bluesky.utils import FailedStatus, Msg

from nvmri_bluesky.errors import NvmriError

__all__ = ["RunEngine", "readable_failures", "failure_reason", "install_suspenders",
           "remember_protocol_attributes", "skip_unrecorded_span_attributes"]


def skip_unrecorded_span_attributes() -> bool:
    """Compute a message's OpenTelemetry span attributes only for a span that records them.

    bluesky's RunEngine gives every ``set``, ``wait``, ``complete`` and
    ``collect`` message (and every run) a tracing span and fills in its
    attributes: the object's repr, the arguments, the keyword arguments as JSON.
    Without a configured tracer provider the spans record nothing
    (``span.is_recording()`` is False) and their ``set_attribute`` does
    nothing, but the attributes were still computed, for every point of a
    raster.  This computes them only for a span that records them; with a
    tracer configured nothing changes.

    Returns
    -------
    bool
        Whether bluesky's attribute function was found (and is now wrapped).
    """
    import bluesky.run_engine as bluesky_run_engine

    fill = getattr(bluesky_run_engine, "_set_span_msg_attributes", None)
    if fill is None:
        return False
    if getattr(fill, "_nvmri_recording_only", False):
        return True

    def fill_if_recording(span: Any, msg: Any) -> None:
        if span.is_recording():
            fill(span, msg)

    fill_if_recording._nvmri_recording_only = True  # type: ignore[attr-defined]
    fill_if_recording.__wrapped__ = fill  # type: ignore[attr-defined]
    bluesky_run_engine._set_span_msg_attributes = fill_if_recording
    return True


def remember_protocol_attributes() -> bool:
    """Python < 3.12: compute each runtime-checkable Protocol's attribute names once.

    bluesky checks every message's object against its protocols
    (``isinstance(obj, Readable)`` for each read, ``Movable`` for each set,
    ``WritesExternalAssets`` for each reading it bundles: some 20 checks per
    raster point).  On Python 3.11 each check collects the protocol's
    attribute names again by walking its classes' namespaces
    (``typing._get_protocol_attrs``, 10-80 us a check here); Python 3.12
    collects them once, when the protocol class is created.  This does the
    same by remembering them per protocol class; the checks' answers do not
    change (a protocol class is not changed after it is defined).

    Returns
    -------
    bool
        Whether the names are remembered (False on Python >= 3.12, or where
        ``typing`` has no such function).
    """
    collect = getattr(typing, "_get_protocol_attrs", None)
    if sys.version_info >= (3, 12) or collect is None:
        return False
    if getattr(collect, "_nvmri_remembered", False):
        return True
    known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def remembered(cls: type) -> frozenset:
        try:
            return known[cls]
        except (KeyError, TypeError):
            attrs = frozenset(collect(cls))
            try:
                known[cls] = attrs
            except TypeError:          # not weakly referencable: not remembered
                pass
            return attrs

    remembered._nvmri_remembered = True  # type: ignore[attr-defined]
    remembered.__wrapped__ = collect  # type: ignore[attr-defined]
    typing._get_protocol_attrs = remembered  # type: ignore[attr-defined]
    return True


def failure_reason(exc: BaseException) -> str:
    """One readable line for a failed status: its own error, not the status's repr."""
    cause = exc.__cause__ if isinstance(exc, FailedStatus) else exc
    if isinstance(exc, FailedStatus) and cause is None:
        status = exc.args[0] if exc.args else None
        obj = getattr(getattr(status, "obj", None), "name", None) or "a device"
        return f"{obj}: the operation failed without a reason ({type(status).__name__})"
    if isinstance(cause, NvmriError):
        return str(cause)
    return f"{type(cause).__name__}: {cause}"


def readable_failures(plan: Any) -> Generator[Msg, Any, Any]:
    """``plan``, with a failed status reported by its real reason.

    A RunEngine preprocessor (``RE.preprocessors.append(readable_failures)``):
    a ``FailedStatus`` leaving the plan is re-raised as :class:`NvmriError`
    with the status's own error, and the ``close_run`` that bluesky's run
    wrapper yields for it carries that reason instead of the status's repr.

    Yields
    ------
    Msg
    """
    gen = iter(plan)
    reply: Any = None
    error: BaseException | None = None
    failed: FailedStatus | None = None          # the last failure thrown into the plan
    while True:
        try:
            msg = gen.throw(error) if error is not None else gen.send(reply)
        except StopIteration as stop:
            return stop.value
        except FailedStatus as exc:
            raise NvmriError(failure_reason(exc)) from exc
        error = None
        if (failed is not None and msg.command == "close_run"
                and msg.kwargs.get("reason") == str(failed)):
            msg = msg._replace(kwargs={**msg.kwargs, "reason": failure_reason(failed)})
            failed = None
        try:
            reply = yield msg
        except GeneratorExit:
            gen.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - hand every throw on to the plan
            error, reply = exc, None
            if isinstance(exc, FailedStatus):
                failed = exc


class RunEngine(bluesky.RunEngine):
    """bluesky's RunEngine whose stop documents name the cause (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        remember_protocol_attributes()
        skip_unrecorded_span_attributes()
        super().__init__(*args, **kwargs)
        self._abort_reason = ""
        self.preprocessors.append(readable_failures)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run a plan (``bluesky.RunEngine.__call__``)."""
        self._abort_reason = ""
        return super().__call__(*args, **kwargs)

    def abort(self, reason: str = "") -> Any:
        """Abort the running or paused plan; ``reason`` reaches the stop document."""
        self._abort_reason = reason
        return super().abort(reason)

    def emit_sync(self, name: Any, doc: dict) -> None:
        """Emit a document; an aborted run's stop document keeps the abort's reason."""
        if (str(getattr(name, "value", name)) == "stop" and doc.get("exit_status") == "abort"
                and not doc.get("reason") and self._abort_reason):
            doc["reason"] = self._abort_reason
        super().emit_sync(name, doc)


def install_suspenders(RE: Any, health: Any, sleep_s: float = 1.0,
                       notify: Callable[[str], None] | None = None) -> list[Any]:
    """Suspend ``RE``'s runs while the laser is in fault (``health.laser_ok`` = 0).

    The run resumes ``sleep_s`` after the laser is back, from its last
    checkpoint (every raster point is one), so the points of the fault are
    repeated.  (``stage_ok`` is not a suspender: a tip below z_min does not
    heal by waiting.)

    Parameters
    ----------
    RE
        The RunEngine.
    health
        The instrument's ``Health`` device.
    sleep_s : float
        Wait after the fault clears before resuming, s.
    notify : callable, optional
        Called with a short text when the fault starts and ends (a
        :class:`~nvmri_bluesky.callbacks.Progress` line's ``note``).

    Returns
    -------
    list
        The suspenders installed.
    """
    suspender = SuspendBoolLow(health.laser_ok, sleep=sleep_s,
                               tripped_message="the laser is in fault (HEALTH:LASER_OK)")
    RE.install_suspender(suspender)
    if notify is not None:
        def on_value(*, value: Any = None, **_: Any) -> None:
            notify("" if value else "suspended: laser fault (HEALTH:LASER_OK), waiting")

        health.laser_ok.subscribe(on_value, run=False)
    return [suspender]
