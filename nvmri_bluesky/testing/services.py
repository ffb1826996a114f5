"""A server subprocess in its own process group, and how the harness starts one.

Every server binds to 127.0.0.1 on a free port and runs in its own process
group, so :meth:`Service.stop` ends it and its children (the RE Manager's
worker) and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.sim.launch import ProcessHandle, stoppable_by_sigint

__all__ = ["Service", "HttpService", "stopped_on_failure", "spawn", "base_env", "entry_point"]


def entry_point(target: str) -> list[str]:
    """``python -c`` command line that runs a console-script entry point ``module:function``."""
    module, func = target.split(":")
    return [sys.executable, "-c",
            f"import sys; from {module} import {func} as f; sys.exit(f())"]


class Service(ProcessHandle):
    """A server subprocess started here, in its own process group.

    Attributes
    ----------
    name : str
        What it is (for messages).
    process : subprocess.Popen
    log_path : Path
        Its combined stdout and stderr.
    """

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path) -> None:
        super().__init__(process, log_path)
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} {self._state()}>"

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` non-empty lines of its output."""
        return "\n".join(self._log_lines(lines))

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; raise ``NvmriError`` on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise NvmriError(f"{self.name} exited (code {self.process.returncode}) before "
                                 f"{what}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            if time.monotonic() > deadline:
                raise NvmriError(f"{self.name} not {what} after {timeout:g} s:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.2)

    def _send(self, sig: int) -> None:
        os.killpg(self.process.pid, sig)           # the whole group (e.g. its worker)

    def stop(self, timeout: float = 10.0) -> int | None:
        """End the process group: SIGINT, then SIGTERM, then SIGKILL; return the exit code."""
        if self._stopped:
            return self.process.returncode
        rc = self._terminate(timeout)
        # Children left in the group (e.g. a worker) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return rc


class HttpService(Service):
    """A server subprocess that answers HTTP at ``uri``.

    Attributes
    ----------
    uri : str
        ``http://127.0.0.1:<port>``.
    """

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path, uri: str) -> None:
        super().__init__(name, process, log_path)
        self.uri = uri

    def _answers(self, path: str, any_status: bool = False) -> bool:
        """True if ``GET <uri><path>`` gives 200 (with ``any_status``: any HTTP answer)."""
        try:
            with urllib.request.urlopen(f"{self.uri}{path}", timeout=2) as response:
                return any_status or response.status == 200
        except urllib.error.HTTPError:
            return any_status
        except (urllib.error.URLError, OSError):
            return False

    def ready(self) -> bool:
        """True once the server answers."""
        raise NotImplementedError

    def wait_ready(self, timeout: float = 180.0) -> Self:
        """Block until :meth:`ready`; raise ``NvmriError`` on timeout or exit."""
        self.wait_until(self.ready, timeout, f"answering at {self.uri}")
        return self


@contextlib.contextmanager
def stopped_on_failure(service: Service, **stop: Any) -> Iterator[Service]:
    """Stop ``service`` (``service.stop(**stop)``) if the block raises, even on Ctrl-C."""
    try:
        yield service
    except BaseException:
        service.stop(**stop)
        raise


def spawn(name: str, cmd: Sequence[str], env: Mapping[str, str], log_dir: Path | None,
          cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """Start ``cmd`` in a new session with its output in ``<log_dir>/<name>.log``."""
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="nvmri-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(stoppable_by_sigint(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=dict(env),
                                   cwd=str(cwd) if cwd else None, start_new_session=True)
    return process, log_path


def base_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with unbuffered Python and matplotlib's Agg backend."""
    out = dict(os.environ if env is None else env)
    out.setdefault("PYTHONUNBUFFERED", "1")
    out.setdefault("MPLBACKEND", "Agg")
    return out
