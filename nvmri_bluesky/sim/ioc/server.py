"""Serving the IOC: building it, the port check, the log filter, the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.net import LOOPBACK
from nvmri_bluesky.sim import access
from nvmri_bluesky.sim.engine import Engine
from nvmri_bluesky.sim.ioc.autosave import Autosave
from nvmri_bluesky.sim.ioc.instrument import NvmriIOC
from nvmri_bluesky.sim.scenario import Scenario, list_scenarios, load_scenario

__all__ = [
    "make_ioc", "serve", "pv_names", "main", "add_arguments", "run_from_args",
]

class _DropRefusals(logging.Filter):
    """Keep expected refusals out of the IOC's log (NvmriError, caproto's limit and
    conversion refusals: a value outside the limits, an enum index that does not exist)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NvmriError) or type(exc).__name__ in _REFUSALS
                    or _in_conversion(exc))


def _in_conversion(exc: BaseException | None) -> bool:
    """True if ``exc`` came from caproto converting a put's data (a value it cannot take)."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "convert_values":
            return True
        tb = tb.tb_next
    return False


_REFUSALS = ("CannotExceedLimits", "CaprotoConversionError")


def make_ioc(scenario: Scenario | str | None = None, prefix: str = "NVMRI:",
             time_scale: float = 0.0, autosave: str | os.PathLike | None = None) -> NvmriIOC:
    """Build the IOC over a fresh :class:`Engine` (not yet serving)."""
    return NvmriIOC(prefix=prefix, engine=Engine(scenario, time_scale=time_scale),
                    autosave=Autosave(autosave))


def _check_port_free(port: int) -> None:
    """Refuse a CA port that another process holds (UDP search or TCP) on 127.0.0.1."""
    for kind, name in ((socket.SOCK_DGRAM, "UDP"), (socket.SOCK_STREAM, "TCP")):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:      # (a closed connection's TIME_WAIT is no holder)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, port))
            except OSError as exc:
                raise NvmriError(f"--port {port} is taken on 127.0.0.1 ({name}: "
                                 f"{exc.strerror}); choose a free port") from None


def serve(scenario: Scenario | str | None = None, prefix: str = "NVMRI:",
          time_scale: float = 0.0, port: int | None = None,
          autosave: str | os.PathLike | None = None, exit_with_parent: bool = False) -> None:
    """Serve the simulated instrument on 127.0.0.1 until interrupted (blocking).

    Parameters
    ----------
    scenario : Scenario, name or path, optional
        Default: the ``default`` built-in scenario.
    prefix : str
        PV prefix.
    time_scale : float
        Wall seconds per simulated second of acquisitions and moves (0: instant).
    port : int, optional
        CA server (UDP search and first TCP) port; default the EPICS environment's.
        A port that another process holds is refused (:class:`NvmriError`).
    autosave : str or Path, optional
        File that keeps stage positions and soft limits across restarts.
    exit_with_parent : bool
        Stop (as on Ctrl-C) when the process that started this one is gone, so
        an IOC whose launcher was killed (SIGKILL, a crash) does not stay behind.

    Notes
    -----
    Call from the main thread: SIGINT stops the IOC even where the process
    inherited it ignored.
    """
    # SIGINT is how launchers stop an IOC, also when this process inherited it
    # ignored (started in the background by a shell without job control, nohup, CI)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if port is not None:
        _check_port_free(port)
        os.environ["EPICS_CA_SERVER_PORT"] = os.environ["EPICS_CAS_SERVER_PORT"] = str(port)
    logging.getLogger("caproto").addFilter(_DropRefusals())
    for name in ("caproto.ctx", "caproto.circ"):
        logging.getLogger(name).addFilter(_DropRefusals())
    ioc = make_ioc(scenario, prefix, time_scale, autosave)
    from nvmri_bluesky.sim.ioc.circuit import BatchingContext

    policy = access.policy_from_env()  # CA access security: nvmri_bluesky/sim/access.py
    access.install(ioc.pvdb, policy)

    async def run() -> None:
        ctx = BatchingContext(ioc.pvdb, access.interfaces_from_env())
        ioc.context = ctx

        async def ready(async_lib) -> None:
            while ctx.port is None:
                await asyncio.sleep(0.01)
            print(f"NVMRI IOC ready prefix={prefix} port={ctx.port} pvs={len(ioc.pvdb)}; "
                  f"{policy.describe()}", flush=True)

        if exit_with_parent:
            asyncio.get_running_loop().create_task(_exit_with_parent(os.getppid()))
        await ctx.run(startup_hook=ready)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


async def _exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """SIGINT to this process once its parent ``parent`` has gone (it is re-parented)."""
    while os.getppid() == parent:
        await asyncio.sleep(period_s)
    print(f"NVMRI IOC: parent process {parent} is gone; stopping", flush=True)
    os.kill(os.getpid(), signal.SIGINT)


def pv_names(prefix: str = "NVMRI:") -> list[str]:
    """Every PV the IOC serves (motor records listed by record name)."""
    ioc = NvmriIOC(prefix=prefix, engine=Engine("paper-fig2"))
    return list(ioc.pvdb)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nvmri_bluesky.sim.ioc``: serve the simulated instrument."""
    from nvmri_bluesky.sim import ioc

    parser = argparse.ArgumentParser(prog="nvmri-sim-ioc",
                                     description=ioc.__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        run_from_args(parser.parse_args(argv))
    except NvmriError as exc:
        print(f"nvmri sim-ioc: {exc}", file=sys.stderr)
        return 2
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nvmri sim-ioc`` (and ``python -m nvmri_bluesky.sim.ioc``): one parser."""
    parser.add_argument("--scenario", default="default",
                        help=f"built-in name ({', '.join(list_scenarios())}) or a "
                             ".json/.yaml file")
    parser.add_argument("--prefix", default="NVMRI:", help="PV prefix (default NVMRI:)")
    parser.add_argument("--time-scale", type=float, default=0.0,
                        help="wall seconds per simulated second (default 0: instant)")
    parser.add_argument("--port", type=int, default=None,
                        help="CA server port (default: EPICS env); a taken port is refused")
    parser.add_argument("--autosave", default=None,
                        help="file keeping stage positions and soft limits across restarts")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop when the process that started this one is gone")
    parser.add_argument("--list-pvs", action="store_true", help="print the PV names and exit")


def run_from_args(args: argparse.Namespace) -> None:
    """Serve (or list the PVs) as the parsed :func:`add_arguments` options say."""
    if args.time_scale < 0:
        raise NvmriError(f"--time-scale must be >= 0, got {args.time_scale}")
    if args.list_pvs:
        print("\n".join(pv_names(args.prefix)))
        return
    serve(load_scenario(args.scenario), args.prefix, args.time_scale, args.port,
          args.autosave, exit_with_parent=args.exit_with_parent)
