"""SIGTERM handled like Ctrl-C, so a job scheduler's stop leaves nothing behind.

``timeout``, systemd and batch schedulers end a command with SIGTERM, which
by default kills Python at once: no ``finally``, no IOC stopped, no run
closed.  :func:`handle_sigterm` makes SIGTERM do what Ctrl-C does (the
RunEngine pauses, the run is aborted with a reason, the simulated IOCs and
worker processes are stopped) and forwards it to this process's
``multiprocessing`` workers as SIGINT, as a terminal's Ctrl-C reaches them.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from types import FrameType

__all__ = ["end_with", "handle_sigterm", "reason", "terminated"]

_received: list[int] = []


def terminated() -> bool:
    """Whether this process has received SIGTERM (with :func:`handle_sigterm` installed)."""
    return signal.SIGTERM in _received


def reason() -> str:
    """Why this process is being interrupted, for a stop document."""
    if signal.SIGTERM in _received:
        return "terminated (SIGTERM)"
    return "interrupted (Ctrl-C)"


def _forward_to_workers() -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signal.SIGINT)
        except (OSError, TypeError):      # gone meanwhile, or not started
            pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    _forward_to_workers()
    handler = signal.getsignal(signal.SIGINT)      # the RunEngine's while a plan runs
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def handle_sigterm() -> None:
    """Handle SIGTERM like SIGINT (Ctrl-C) in this process (call from the main thread)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def end_with(pid: int) -> None:
    """Have this process receive SIGTERM when process ``pid`` ends (Linux; a no-op elsewhere).

    For worker processes: with :func:`handle_sigterm` installed, a main process
    that was killed outright (SIGKILL, a crash) still ends its workers like
    Ctrl-C, so their runs are closed and their simulated IOCs stopped.  It
    watches ``pid`` itself, not the parent: a ``multiprocessing`` fork server's
    workers are its children, and it waits for them to end.  A daemon thread
    waits on a pidfd of ``pid``.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:          # gone already
        os.kill(os.getpid(), signal.SIGTERM)
        return
    except (AttributeError, OSError):   # not Linux >= 5.3
        return

    def wait() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name=f"nvmri-end-with-{pid}", daemon=True).start()
