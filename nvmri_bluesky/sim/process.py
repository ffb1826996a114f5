"""A subprocess with its output in a log file; stopped with SIGINT first, then harder."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["stoppable_by_sigint", "ProcessHandle"]

_SIGINT_RESTORED = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execvp(sys.argv[1], sys.argv[1:])")


def stoppable_by_sigint(cmd: Sequence[str]) -> list[str]:
    """``cmd``, run so that SIGINT stops it even where this process ignores SIGINT.

    A process started in the background without job control (``cmd &`` in a
    script, nohup, some CI runners) has SIGINT ignored, and its children
    inherit that; :class:`ProcessHandle` stops them with SIGINT first. Then
    ``cmd`` is started through a Python that resets SIGINT before it execs.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return list(cmd)
    return [sys.executable, "-c", _SIGINT_RESTORED, *cmd]


class ProcessHandle:
    """A subprocess started here with its output in a log file; a context manager
    that stops it on exit.

    Attributes
    ----------
    process : subprocess.Popen
    log_path : Path
        Its combined stdout and stderr.
    """

    def __init__(self, process: subprocess.Popen, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self._stopped = False

    @property
    def pid(self) -> int:
        """Process id."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def _state(self) -> str:
        return "running" if self.alive else f"exited {self.process.returncode}"

    def _log_lines(self, lines: int) -> list[str]:
        """The last ``lines`` non-empty lines of the log (none if unreadable)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if ln.strip()][-lines:]

    def _send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def _terminate(self, timeout: float) -> int:
        """SIGINT, then SIGTERM, then SIGKILL (``timeout`` s each) until it exits."""
        self._stopped = True
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self._send(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        return self.process.wait()

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the process; return its exit code."""
        return self.process.returncode if self._stopped else self._terminate(timeout)

    def __enter__(self) -> ProcessHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
