"""Start and stop the simulated IOC as a subprocess on a private Channel Access port.

(The process handle is :mod:`nvmri_bluesky.sim.process`, the private CA
repeater :mod:`nvmri_bluesky.sim.repeater`; ``ProcessHandle`` and
``stoppable_by_sigint`` are re-exported here.)

Channel Access finds a PV by a UDP search to the addresses in
``EPICS_CA_ADDR_LIST`` at the port ``EPICS_CA_SERVER_PORT``; the IOC answers
with the TCP port it serves on.  Giving every session its own search port on
loopback (and a unique PV prefix) keeps parallel sessions, test runs and the
facility's IOCs out of each other's way.

Rules (see :func:`configure_ca_env` and :func:`ioc_env`):

* Client (this process): ``EPICS_CA_ADDR_LIST`` = ``127.0.0.1`` (plus
  ``127.0.0.1:<port>`` for every extra port of a pool),
  ``EPICS_CA_AUTO_ADDR_LIST=NO``, ``EPICS_CA_SERVER_PORT`` = the first port,
  ``EPICS_CA_REPEATER_PORT`` = a private in-process CA repeater.
* libca (pyepics) reads these once, when its context is created, and
  **``import ophyd`` creates it**: :func:`configure_ca_env` (or
  :func:`start_ioc`, or :func:`reserve_ca_ports` for a pool) must run before
  ``import ophyd``.  Afterwards only IOCs on the configured ports are
  reachable and :func:`start_ioc` refuses others with a clear error.
* IOC (subprocess, :func:`ioc_env`): ``EPICS_CA_SERVER_PORT`` =
  ``EPICS_CAS_SERVER_PORT`` = its port (caproto binds its UDP search socket
  there and tries it first for TCP), ``EPICS_CAS_INTF_ADDR_LIST=127.0.0.1``
  (loopback only), beacons to ``127.0.0.1`` only
  (``EPICS_CAS_AUTO_BEACON_ADDR_LIST=NO``) at this process's repeater.
* A unique PV prefix per IOC (:func:`unique_prefix`) as a second fence.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.net import LOOPBACK, free_port
from nvmri_bluesky.sim import repeater
from nvmri_bluesky.sim.process import ProcessHandle, stoppable_by_sigint
from nvmri_bluesky.timeouts import timeout_s

__all__ = [
    "LOOPBACK", "IocHandle", "start_ioc", "configure_ca_env", "reserve_ca_ports", "ioc_env",
    "find_free_port", "client_ports", "ca_initialised", "unique_prefix", "search_pv",
    "ProcessHandle", "stoppable_by_sigint",
]

_lock = threading.RLock()
_configured: list[int] | None = None   # the ports configure_ca_env gave the client
_live: dict[int, IocHandle] = {}        # port -> running IOC started here


# ---------------------------------------------------------------- environment

def ca_initialised() -> bool:
    """True once pyepics has initialised libca in this process (the env is then fixed)."""
    ca = sys.modules.get("epics.ca")
    return ca is not None and getattr(ca, "libca", None) is not None


def client_ports() -> list[int]:
    """The CA search ports this process's client was configured with (empty if none)."""
    return list(_configured or [])


def configure_ca_env(port: int | Sequence[int]) -> dict[str, str]:
    """Point this process's CA client at loopback IOCs on ``port`` (or a pool of ports).

    Must run before the first Channel Access use in the process (pyepics reads
    the environment once, when libca initialises).  Calling it again with the
    same ports is harmless.

    Parameters
    ----------
    port : int or sequence of int
        The UDP search port(s) of the IOC(s) this process will talk to.  A
        pool lets one process reach several IOCs (tests with per-test
        scenarios): every port is searched.

    Returns
    -------
    dict
        The variables set in ``os.environ``.

    Raises
    ------
    NvmriError
        If libca is already initialised with other settings.
    """
    global _configured
    ports = [int(port)] if isinstance(port, int) else [int(p) for p in port]
    ports = list(dict.fromkeys(ports))
    if not ports or any(not 0 < p < 65536 for p in ports):
        raise NvmriError(f"invalid Channel Access port(s) {ports!r}")
    with _lock:
        if ca_initialised() and ports != _configured:
            have = ", ".join(map(str, _configured or [])) or "the shell's EPICS_CA_* settings"
            raise NvmriError(
                "Channel Access is already initialised in this process (searching "
                f"{have}); configure_ca_env({ports}) must run before the first CA use, "
                "i.e. before `import ophyd`")
        env = {
            "EPICS_CA_ADDR_LIST": " ".join(
                [LOOPBACK] + [f"{LOOPBACK}:{p}" for p in ports[1:]]),
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_SERVER_PORT": str(ports[0]),
        }
        if not ca_initialised():
            env["EPICS_CA_REPEATER_PORT"] = str(repeater.start())
        os.environ.update(env)
        _configured = ports
    return env


def reserve_ca_ports(n: int = 4) -> list[int]:
    """Configure this process's CA client for a pool of ``n`` free loopback ports, once.

    Call it early (before ``import ophyd``) in a process that will start one
    or more simulated IOCs later, possibly after ophyd has been imported:
    :func:`start_ioc` then picks a port from the pool.  Does nothing if the
    pool is already configured; raises like :func:`configure_ca_env` if
    Channel Access was initialised without it.

    Returns
    -------
    list of int
        The pool.
    """
    with _lock:
        if _configured is not None:
            return list(_configured)
        pool: list[int] = []
        for _ in range(n):
            pool.append(find_free_port(exclude=pool))
        configure_ca_env(pool)
        return pool


def ioc_env(port: int, base: Mapping[str, str] | None = None,
            beacon_port: int | None = None) -> dict[str, str]:
    """Environment of an IOC subprocess serving on ``LOOPBACK:port`` only.

    Parameters
    ----------
    port : int
        UDP search port (and first TCP port tried).
    base : mapping, optional
        Environment to start from; ``os.environ`` by default.
    beacon_port : int, optional
        Where the IOC sends its beacons (on loopback): this process's private
        CA repeater by default (see :func:`configure_ca_env`), so only this
        process hears them.
    """
    env = dict(os.environ if base is None else base)
    env.update({
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CAS_SERVER_PORT": str(port),
        "EPICS_CAS_INTF_ADDR_LIST": LOOPBACK,
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": LOOPBACK,
        "EPICS_CA_ADDR_LIST": LOOPBACK,
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "PYTHONUNBUFFERED": "1",
    })
    beacon_port = beacon_port or repeater.running_port()
    if beacon_port is not None:
        env["EPICS_CAS_BEACON_PORT"] = str(beacon_port)
    return env


def _port_free(port: int) -> bool:
    """True when nothing holds ``port`` on loopback, for TCP (as caproto binds it) and UDP."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((LOOPBACK, port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, port))
    except OSError:
        return False
    return True


def find_free_port(exclude: Sequence[int] = ()) -> int:
    """A port free on loopback for both TCP and UDP, chosen by the OS.

    Raises
    ------
    NvmriError
        If none is found in 50 tries.
    """
    for _ in range(50):
        port = free_port()
        if port not in exclude and port not in _live and _port_free(port):
            return port
    raise NvmriError("no free TCP/UDP port on 127.0.0.1 for the simulated IOC")


def unique_prefix(stem: str = "NVMRI") -> str:
    """A PV prefix no other session uses, e.g. ``NVMRI_4f2a9c:``."""
    return f"{stem}_{os.getpid() % 0xFFFF:04x}{random.getrandbits(16):04x}:"


def search_pv(pvname: str, port: int, timeout: float = 0.25) -> bool:
    """One CA name search for ``pvname`` at ``LOOPBACK:port``; True if the IOC answers.

    Independent of libca and of the environment, so it is safe before
    :func:`configure_ca_env` and never touches another port.
    """
    import caproto as ca
    from caproto._commands import read_datagram

    cid = random.getrandbits(16)
    request = b"".join(bytes(c) for c in (
        ca.VersionRequest(0, ca.DEFAULT_PROTOCOL_VERSION),
        ca.SearchRequest(pvname, cid, ca.DEFAULT_PROTOCOL_VERSION)))
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        try:
            sock.sendto(request, (LOOPBACK, port))
        except OSError:
            return False
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, addr = sock.recvfrom(ca.MAX_UDP_RECV)
            except (TimeoutError, ConnectionRefusedError, OSError):
                return False
            try:
                commands = read_datagram(data, addr, ca.SERVER)  # parsed as sent by a server
            except Exception:  # noqa: BLE001 - not a CA datagram: keep listening
                continue
            if any(isinstance(c, ca.SearchResponse) and c.cid == cid for c in commands):
                return True
    return False


# ---------------------------------------------------------------- the IOC process

class IocHandle(ProcessHandle):
    """A running simulated IOC subprocess; a context manager that stops it on exit.

    Attributes
    ----------
    prefix : str
        PV prefix it serves (``"NVMRI_....:"``).
    port : int
        Its CA search port on 127.0.0.1.
    scenario : nvmri_bluesky.sim.scenario.Scenario
        The scenario it simulates (for tests; plans must never read it).
    time_scale : float
        Simulated-time factor passed to the IOC.
    process : subprocess.Popen
    log_path : Path
        The IOC's combined stdout/stderr.
    """

    def __init__(self, *, prefix: str, port: int, scenario: Any, time_scale: float,
                 process: subprocess.Popen, workdir: Path):
        self.prefix = prefix
        self.port = port
        self.scenario = scenario
        self.time_scale = time_scale
        self.workdir = workdir
        super().__init__(process, workdir / "ioc.log")

    def __repr__(self) -> str:
        return (f"IocHandle(prefix={self.prefix!r}, port={self.port}, "
                f"scenario={getattr(self.scenario, 'name', self.scenario)!r}, {self._state()})")

    def pv(self, suffix: str) -> str:
        """Full PV name for ``suffix`` (e.g. ``"PG:STATUS"``)."""
        return f"{self.prefix}{suffix}"

    def log_tail(self, lines: int = 8) -> str:
        """Last ``lines`` non-empty lines of the IOC's output, joined with `` | ``."""
        return " | ".join(ln.strip() for ln in self._log_lines(lines))[-1500:]

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the IOC: SIGINT, then SIGTERM, then SIGKILL; return its exit code."""
        with _lock:
            if _live.get(self.port) is self:
                del _live[self.port]
        if self._stopped:
            return self.process.returncode
        rc = self._terminate(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return rc


def _choose_port(port: int | None) -> int:
    """A search port the client can reach; extend the pool while libca is not yet up."""
    pool = client_ports()
    if port is None:
        free = [p for p in pool if p not in _live and _port_free(p)]
        if free:
            return free[0]
        if ca_initialised():
            searched = (f"port(s) {', '.join(map(str, pool))}" if pool
                        else "the shell's EPICS_CA_* settings")
            raise NvmriError(
                "cannot start a simulated IOC that this process can reach: its Channel Access "
                f"client is already initialised (importing ophyd does that) and searches "
                f"{searched}; start the IOC, or call configure_ca_env() with enough ports, "
                "before `import ophyd`")
        port = find_free_port(exclude=pool)
    if port not in pool:
        configure_ca_env([*pool, port])
    elif port in _live:
        raise NvmriError(f"port {port} is already used by {_live[port]!r}")
    return port


def _scenario_arg(scenario: Any, workdir: Path) -> tuple[Any, str]:
    """Validate ``scenario`` here (fast, clear errors) and return (Scenario, CLI argument)."""
    from nvmri_bluesky.sim.scenario import Scenario, load_scenario

    loaded = load_scenario(scenario)
    if isinstance(scenario, Mapping | Scenario):
        path = workdir / f"{loaded.name}.json"
        path.write_text(json.dumps(loaded.to_dict()))
        return loaded, str(path)
    return loaded, str(scenario if scenario is not None else "default")


def start_ioc(scenario: Any = "default", prefix: str | None = None, time_scale: float = 0.0,
              port: int | None = None, *, timeout: float | None = None,
              ready_pv: str = "PG:STATUS", extra_args: Sequence[str] = (),
              configure_client: bool = True) -> IocHandle:
    """Start the simulated IOC on a private loopback port and wait until it answers.

    Also points this process's CA client at it (:func:`configure_ca_env`),
    which must happen before the first CA use, so call this before building
    devices.

    Parameters
    ----------
    scenario : str, Path, dict or Scenario
        Built-in name, scenario file, or the scenario itself (written to a
        temporary JSON file for the IOC).
    prefix : str, optional
        PV prefix; a unique ``NVMRI_xxxxxxxx:`` by default.
    time_scale : float
        Simulated seconds of pulse sequence and motion per wall second
        (0: as fast as possible).
    port : int, optional
        CA search port; by default a free one (from the configured pool if any).
    timeout : float, optional
        Longest wait for the IOC to answer, s (default
        :func:`~nvmri_bluesky.timeouts.timeout_s`).
    ready_pv : str
        PV (without prefix) whose name search proves the IOC is serving.
    extra_args : sequence of str
        More command-line arguments for ``python -m nvmri_bluesky.sim.ioc``.
    configure_client : bool
        Point this process's CA client at the IOC (the default).  False
        starts it on any free port and leaves this process's CA settings
        alone: an IOC for another process, which gets there with
        ``ioc_env(handle.port)``.

    Returns
    -------
    IocHandle
        Stop it with ``.stop()`` or use it as a context manager.

    Raises
    ------
    NvmriError
        Invalid scenario, no usable port, or the IOC did not start in time
        (the message ends with the IOC's last output lines).
    """
    if timeout is None:
        timeout = timeout_s()
    workdir = Path(tempfile.mkdtemp(prefix="nvmri-ioc-"))
    try:
        loaded, scenario_arg = _scenario_arg(scenario, workdir)
        with _lock:
            if configure_client:
                port = _choose_port(port)
            elif port is None:
                port = find_free_port()
        prefix = prefix or unique_prefix()
        cmd = [sys.executable, "-m", "nvmri_bluesky.sim.ioc", "--prefix", prefix,
               "--port", str(port), "--scenario", scenario_arg,
               "--time-scale", repr(float(time_scale)), "--exit-with-parent", *extra_args]
        with open(workdir / "ioc.log", "wb") as log:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=ioc_env(port),
                                       start_new_session=True)
        handle = IocHandle(prefix=prefix, port=port, scenario=loaded,
                           time_scale=float(time_scale), process=process, workdir=workdir)
        with _lock:
            _live[port] = handle
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        _wait_ready(handle, handle.pv(ready_pv), timeout)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_ready(handle: IocHandle, pvname: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not handle.alive:
            raise NvmriError(
                f"simulated IOC exited with code {handle.process.returncode} before serving "
                f"{pvname}: {handle.log_tail() or 'no output'}")
        if search_pv(pvname, handle.port, timeout=0.1):
            return
        if time.monotonic() > deadline:
            raise NvmriError(
                f"simulated IOC did not answer {pvname} on {LOOPBACK}:{handle.port} within "
                f"{timeout:g} s: {handle.log_tail() or 'no output'}")
        time.sleep(0.05)


@atexit.register
def _stop_all() -> None:
    for handle in list(_live.values()):
        with contextlib.suppress(Exception):
            handle.stop(timeout=2.0)
