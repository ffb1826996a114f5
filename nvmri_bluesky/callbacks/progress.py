"""A one-line progress report: points done, rate and time left."""

from __future__ import annotations

import sys
import time
from typing import IO

from bluesky.callbacks.core import CallbackBase


class Progress(CallbackBase):
    """Print ``[plan] done/total points, rate, time left`` on one refreshed line.

    Parameters
    ----------
    stream : file, optional
        Where to write (default stderr).
    interval_s : float
        Least time between refreshes, s.
    label : str, optional
        Prefix of every line (e.g. the sample, when several run at once).
    inline : bool
        Refresh one line in place (a terminal); False prints each refresh as
        a line of its own (logs, or several processes sharing a terminal).
    """

    def __init__(self, stream: IO[str] | None = None, interval_s: float = 0.5,
                 label: str = "", inline: bool = True) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.prefix = f"{label} " if label else ""
        self.head, self.tail = ("\r", "") if inline else ("", "\n")
        self._reset()

    def _reset(self) -> None:
        self.plan, self.total, self.done = "", None, 0
        self.t0 = self.t_last = time.monotonic()
        self.notice = ""

    def note(self, text: str) -> None:
        """Show ``text`` on the progress line now and until the next ``note("")``.

        For what the documents do not tell, e.g. a run suspended while the
        laser is in fault (:func:`~nvmri_bluesky.run_engine.install_suspenders`).
        """
        if text == self.notice:
            return
        self.notice = text
        if self.plan:
            self._write(self.head + self.line(time.monotonic()) + self.tail)

    def start(self, doc: dict) -> None:
        self._reset()
        self.plan = doc.get("plan_name", "run")
        self.total = doc.get("num_points")

    def event(self, doc: dict) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.t_last >= self.interval_s:
            self.t_last = now
            self._write(self.head + self.line(now) + self.tail)

    def stop(self, doc: dict) -> None:
        status = doc.get("exit_status", "?")
        reason = f" ({doc['reason']})" if doc.get("reason") else ""
        self._write(self.head + self.line(time.monotonic()) + f"  {status}{reason}\n")

    def line(self, now: float) -> str:
        """The progress line as it stands at ``now`` (monotonic seconds)."""
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        text = f"{self.prefix}[{self.plan}] {self.done}"
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            text += f"/{self.total} points ({100 * self.done / self.total:3.0f}%)"
            text += f"  {rate:7.1f} pt/s  {left:6.1f} s left"
        else:
            text += f" points  {rate:7.1f} pt/s"
        text += f"  {elapsed:6.1f} s"
        return f"{text}  [{self.notice}]" if self.notice else text

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
