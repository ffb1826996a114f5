"""The ``nvmri`` command: thin argument parsing over the package's modules.

Every subcommand reports a user error as one line on stderr and exits
non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from nvmri_bluesky import __version__
from nvmri_bluesky.errors import NvmriError

# --------------------------------------------------------------------------------------
# What the catalog subcommands print (the catalog modules return data).


def format_runs(rows: list[Any]) -> str:
    """The ``nvmri runs`` table of :meth:`Catalog.runs` rows (``RunRow``)."""
    header = ("uid", "time", "plan", "scenario", "points", "status")
    lines = [
        (
            r.uid[:8],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time)),
            r.plan or "-",
            r.scenario or "-",
            "-" if r.points is None else str(r.points),
            r.status,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(
        f"{{:{'>' if h == 'points' else '<'}{w}}}" for h, w in zip(header, widths, strict=True)
    )
    out = [fmt.format(*header)] + [fmt.format(*line) for line in lines]
    return "\n".join(s.rstrip() for s in out)


def cli_runs(location: str | None, api_key: str | None = None) -> str:
    """``nvmri runs``: the runs of a catalog as a printable table (newest first)."""
    from nvmri_bluesky.catalog import open_catalog

    with open_catalog(location, api_key, create=False) as catalog:
        rows = catalog.runs()
        if not rows:
            return f"no runs in catalog {catalog.location}"
        return format_runs(rows)


def cli_import(spool: str | Path, location: str | None, api_key: str | None = None) -> str:
    """``nvmri import``: load spool file(s) into a catalog; a printable summary.

    Raises
    ------
    NvmriError
        If any file failed (the message summarises which and why).
    """
    from nvmri_bluesky.catalog import default_location, import_spool

    results = import_spool(spool, location if location is not None else default_location(), api_key)
    lines = [
        f"{(r.uid[:8] or '-'):<8}  {r.action:<8}  {r.events:>6} events  {Path(r.path).name}"
        + (f"  ({r.detail})" if r.detail else "")
        for r in results
    ]
    failed = [r for r in results if r.action == "failed"]
    if failed:
        first = failed[0]
        raise NvmriError(
            f"{len(failed)} of {len(results)} spool file(s) not imported; "
            f"{Path(first.path).name}: {first.detail}"
        )
    counts = {a: sum(r.action == a for r in results) for a in ("imported", "replaced", "present")}
    lines.append(
        f"{len(results)} file(s): {counts['imported']} imported, {counts['replaced']} replaced, "
        f"{counts['present']} already present"
    )
    return "\n".join(lines)


def cli_verify(
    uid: str | None,
    location: str | None,
    api_key: str | None = None,
    spool_dirs: Iterable[str | Path] | None = None,
) -> tuple[str, bool]:
    """``nvmri catalog verify UID|--all``: the printable report and whether all matched.

    Parameters
    ----------
    uid : str or None
        One run (uid or unique prefix); None verifies every spooled run.
    location : str or None
        The catalog (default :func:`default_location`).
    api_key : str, optional
        For a facility catalog.
    spool_dirs : iterable of path, optional
        Where the spool files are (default :func:`default_spool_dir`).
    """
    from nvmri_bluesky.catalog import (
        default_location,
        default_spool_dir,
        find_spool,
        open_catalog,
        verify_all,
        verify_run,
    )

    location = location or default_location()
    dirs = [Path(d) for d in spool_dirs] if spool_dirs else [default_spool_dir(location)]
    with open_catalog(location, api_key, create=False) as catalog:
        if uid is None:
            results = verify_all(catalog, dirs)
        else:
            results = [verify_run(catalog, find_spool(uid, dirs))]
    if not results:
        shown = ", ".join(str(d) for d in dirs)
        return f"no spool files in {shown}", True
    lines = []
    for result in results:
        lines.append(result.summary())
        lines.extend(f"    {detail}" for detail in result.details)
    bad = sum(not r.ok for r in results)
    events = sum(r.events for r in results)
    lines.append(f"{len(results)} run(s), {events} events compared: "
                 + ("all match their spool" if not bad else f"{bad} run(s) differ"))
    return "\n".join(lines), bad == 0


def _sim_ioc(args: argparse.Namespace) -> int:
    from nvmri_bluesky.sim import ioc

    ioc.run_from_args(args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from nvmri_bluesky import demo

    demo.run(scenario=args.scenario, out=args.out, catalog=args.catalog, prefix=args.prefix,
             api_key=args.api_key, quick=args.quick, jobs=args.jobs,
             steps=tuple(args.steps.split(",")) if args.steps else None,
             adaptive=args.adaptive)
    return 0


def _runs(args: argparse.Namespace) -> int:
    print(cli_runs(args.catalog, api_key=args.api_key))
    return 0


def _import(args: argparse.Namespace) -> int:
    print(cli_import(args.spool, args.catalog, api_key=args.api_key))
    return 0


def _verify(args: argparse.Namespace) -> int:
    text, ok = cli_verify(None if args.all else args.uid, args.catalog,
                          api_key=args.api_key, spool_dirs=args.spool)
    print(text)
    return 0 if ok else 1


def _replay(args: argparse.Namespace) -> int:
    from nvmri_bluesky import replay

    for path in replay.replay(args.uid, args.catalog, api_key=args.api_key, out_dir=args.out):
        print(path)
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from nvmri_bluesky.analysis.run import cli_reconstruct

    print(cli_reconstruct(args.uid, args.catalog, api_key=args.api_key, as_json=args.json))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from nvmri_bluesky import bench

    return bench.run(args.names or None, as_json=args.json)


def _validate(args: argparse.Namespace) -> int:
    from nvmri_bluesky.validate.runner import run

    run(args.seeds, jobs=args.jobs, as_json=args.json, out=args.out, start=args.start,
        timeout_s=args.timeout)
    return 0


def _serve_catalog(args: argparse.Namespace) -> int:
    from nvmri_bluesky import catalog

    catalog.serve_catalog(args.config, host=args.host, port=args.port)
    return 0


def _live(args: argparse.Namespace) -> int:
    from nvmri_bluesky.callbacks import remote

    remote.run_live(args.address, out_dir=args.out, max_runs=args.max_runs)
    return 0


def _catalog_args(p: argparse.ArgumentParser) -> None:
    """``--catalog`` and ``--api-key`` of the commands that read a catalog."""
    p.add_argument("--catalog", default=None,
                   help="catalog directory (embedded tiled) or http(s) URI "
                        "(default: $NVMRI_CATALOG, else ~/.local/share/nvmri/catalog)")
    p.add_argument("--api-key", default=None,
                   help="tiled API key for a facility URI (default: $NVMRI_API_KEY)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    """The options of ``nvmri demo``."""
    p.add_argument("--scenario", default=None,
                   help="built-in name or file (default: the paper's built-in scenarios)")
    p.add_argument("--out", default="nvmri-demo", help="output directory")
    p.add_argument("--catalog", default=None,
                   help="catalog directory or facility URI (default: OUT/catalog)")
    p.add_argument("--api-key", default=None, help="tiled API key for a facility URI")
    p.add_argument("--prefix", default=None,
                   help="PV prefix of a running instrument (default: start the simulator)")
    p.add_argument("--quick", action="store_true", help="a reduced (faster) protocol")
    p.add_argument("--jobs", type=int, default=4,
                   help="samples measured at once, each with its own IOC (default 4)")
    p.add_argument("--steps", default=None,
                   help="comma-separated protocol steps: calibration,sample,spins,layers,"
                        "adaptive (default: each sample's own)")
    p.add_argument("--adaptive", action="store_true",
                   help="single spins adaptively (plans.adaptive.adaptive_spin: measure where "
                        "the information is, stop at the target sigma) instead of the fixed "
                        "fine and zoom rasters: the single-spin sample's step becomes "
                        "'adaptive'")


def _catalog_commands(p: argparse.ArgumentParser) -> None:
    """``nvmri catalog import`` and ``nvmri catalog verify``."""
    csub = p.add_subparsers(dest="catalog_command", required=True)
    imp = csub.add_parser("import", help="load a document spool (JSON lines) into a catalog")
    imp.add_argument("spool", help="spool file or directory of spool files")
    imp.set_defaults(catalog_func=_import)
    _catalog_args(imp)
    ver = csub.add_parser("verify", help="compare runs in the catalog with their spool, "
                                         "event by event (arrays and scalars)")
    which = ver.add_mutually_exclusive_group(required=True)
    which.add_argument("uid", nargs="?", help="run uid (or a unique prefix)")
    which.add_argument("--all", action="store_true", help="every run that has a spool file")
    ver.add_argument("--spool", action="append", default=None,
                     help="spool directory (repeatable; default: $NVMRI_SPOOL, else "
                          "the catalog's spool/ or ~/.local/share/nvmri/spool)")
    ver.set_defaults(catalog_func=_verify)
    _catalog_args(ver)


def _validate_args(p: argparse.ArgumentParser) -> None:
    """The options of ``nvmri validate``."""
    p.add_argument("--seeds", type=int, default=30, help="number of samples (default 30)")
    p.add_argument("--jobs", type=int, default=1, help="samples run at once (default 1)")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--out", default="nvmri-validate",
                   help="working directory: scenario files, demo outputs, validate.json")
    p.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--timeout", type=float, default=None,
                   help="per-sample time limit, s (default: none)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nvmri`` command."""
    parser = argparse.ArgumentParser(prog="nvmri", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nvmri_bluesky {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    from nvmri_bluesky.sim import ioc

    ioc.add_arguments(command("sim-ioc", _sim_ioc,
                              "serve the simulated instrument over Channel Access"))
    _demo_args(command("demo", _demo, "run the paper's experiment end to end and write a report"))
    _catalog_args(command("runs", _runs, "list the runs in a catalog"))
    _catalog_commands(command("catalog", lambda a: a.catalog_func(a), "catalog maintenance"))

    p = command("replay", _replay, "feed a stored run through the live callbacks")
    p.add_argument("uid", help="run uid (or a unique prefix)")
    p.add_argument("--out", default=".", help="where to write the redrawn figures")
    _catalog_args(p)

    p = command("reconstruct", _reconstruct, "reconstruct a stored run")
    p.add_argument("uid", help="run uid (or a unique prefix)")
    p.add_argument("--json", action="store_true", help="print report.json-shaped JSON")
    _catalog_args(p)

    p = command("bench", _bench, "run benchmarks from benchmarks/")
    p.add_argument("names", nargs="*", help="benchmark names (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    _validate_args(command("validate", _validate, "run the default protocol on random samples "
                                                  "and grade it against their truth"))

    p = command("serve-catalog", _serve_catalog, "serve a facility tiled catalog")
    p.add_argument("--config", required=True, help="tiled server config (YAML)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)

    p = command("live", _live, "draw live slices from documents published over 0MQ")
    p.add_argument("--address", default="127.0.0.1:5578", help="0MQ proxy output host:port")
    p.add_argument("--out", default=".", help="where to write figures")
    p.add_argument("--max-runs", type=int, default=None, help="exit after this many runs")
    return parser


def user_error(exc: BaseException) -> NvmriError | None:
    """The :class:`NvmriError` behind ``exc`` (e.g. inside a RunEngine's FailedStatus)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NvmriError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nvmri`` console script."""
    import logging

    args = build_parser().parse_args(argv)
    from nvmri_bluesky.interrupts import handle_sigterm
    from nvmri_bluesky.threads import one_blas_thread

    one_blas_thread()           # small matrices, many processes: BLAS threads only spin

    handle_sigterm()            # SIGTERM (timeout, systemd) cleans up like Ctrl-C
    if not args.debug:
        logging.getLogger("bluesky").setLevel(logging.CRITICAL)  # errors are reported below
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        from nvmri_bluesky.interrupts import reason

        print(f"nvmri {args.command}: {reason()}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        err = user_error(exc)
        text = str(err) if err is not None else f"{type(exc).__name__}: {exc}"
        print(f"nvmri {args.command}: error: {text.splitlines()[0] if text else ''}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
