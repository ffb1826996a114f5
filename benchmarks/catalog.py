"""catalog: what a catalog costs a raster, and raster writers for the concurrent-writer tests.

Not one of ``nvmri bench``'s ``bench_*`` benchmarks (it needs the machine's
PostgreSQL); run it from the repository root:

    python -m benchmarks.catalog overhead --n 8 --repeats 3

times the same ``esr_raster`` with no catalog, an embedded one and a facility
(PostgreSQL) one and prints the per-point overhead as JSON (it starts a
simulated IOC and, without ``--catalog``, a facility catalog server on fresh
databases through :mod:`nvmri_bluesky.testing`).

    python -m benchmarks.catalog write-raster --shape 50,40 --go FILE

is one RunEngine writing one locked ``deer_raster`` to ``$NVMRI_CATALOG``
(:func:`write_raster`): the writer process of the concurrent-writer tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError

__all__ = ["measure_catalog_overhead", "write_raster", "main"]


def _stop_clock(marks: list[float]) -> Callable[[str, dict], None]:
    """A document callback appending the time of each stop document to ``marks``."""

    def note(name: str, doc: dict) -> None:
        if name == "stop":
            marks.append(time.perf_counter())

    return note


def measure_catalog_overhead(prefix: str, catalogs: Mapping[str, str | None],
                             api_key: str | None = None, n: int = 8, repeats: int = 2,
                             spool_dir: str | Path | None = None) -> dict[str, Any]:
    """Time the same raster with and without each catalog; the per-point overhead.

    Runs in this process, against the IOC at ``prefix`` (this process's CA
    environment must reach it). The raster is an ``esr_raster`` of ``n`` x
    ``n`` points (the cheapest raster, so the catalog's share shows).

    Parameters
    ----------
    prefix : str
        The IOC's PV prefix.
    catalogs : mapping
        ``{label: location}``; ``None`` is the baseline without a catalog,
        a directory an embedded catalog, an ``http://`` URI a facility one.
    api_key : str, optional
        Key for the facility catalog(s).
    n : int
        Points per axis.
    repeats : int
        Runs per catalog, taken in turn across catalogs; the fastest counts.
    spool_dir : path, optional
        Document spool directory (default: a temporary one).

    Returns
    -------
    dict
        ``{"points": n*n, "seconds": {label: s}, "ms_per_point": {label: ms},
        "stop_wait_s": {label: s the run waited at its stop document},
        "overhead_ms_per_point": {label: ms over the baseline},
        "overhead_in_run_ms_per_point": {label: the same without the wait at stop}}``.
    """
    from bluesky import RunEngine

    from nvmri_bluesky.catalog import open_catalog
    from nvmri_bluesky.devices import make_devices
    from nvmri_bluesky.profile import bound_plans

    devices = make_devices(prefix)
    plans = bound_plans(devices, ("esr_raster",))
    spool = Path(spool_dir) if spool_dir else Path(tempfile.mkdtemp(prefix="nvmri-spool-"))
    seconds: dict[str, float] = {}
    stop_wait: dict[str, float] = {}

    def raster() -> Any:
        return plans["esr_raster"]((-10, 10, n), (-10, 10, n), 30.0, 6.233e9)

    engines: dict[str, tuple[Any, list[float]]] = {}
    opened: list[Any] = []
    try:
        for label, location in catalogs.items():
            RE = RunEngine({})
            stopped_at: list[float] = []
            # Subscribed before the catalog: notes when the stop document leaves the plan,
            # so that the wait for the catalog writer at the stop is measured apart.
            RE.subscribe(_stop_clock(stopped_at))
            if location is not None:
                catalog = open_catalog(location, api_key=api_key if "://" in location else None)
                opened.append(catalog)
                catalog.subscribe(RE, spool / label)
            RE(raster())  # warm-up: first connections and imports
            engines[label] = (RE, stopped_at)
        # Round robin, fastest of ``repeats``: load that comes and goes hits every label alike.
        for _ in range(repeats):
            for label, (RE, stopped_at) in engines.items():
                stopped_at.clear()
                t0 = time.perf_counter()
                RE(raster())
                t1 = time.perf_counter()
                if t1 - t0 < seconds.get(label, float("inf")):
                    seconds[label], stop_wait[label] = t1 - t0, t1 - stopped_at[-1]
        for catalog in opened:
            if catalog.writer_errors:
                raise NvmriError(f"catalog {catalog.location}: {catalog.writer_errors[0]}")
    finally:
        for catalog in opened:
            catalog.close()
        devices.destroy()
    points = n * n
    per_point = {k: 1e3 * v / points for k, v in seconds.items()}
    base = next((per_point[k] for k, v in catalogs.items() if v is None), None)
    in_run = {k: 1e3 * (seconds[k] - stop_wait[k]) / points for k in seconds}
    base_in_run = next((in_run[k] for k, v in catalogs.items() if v is None), None)
    with_catalog = [k for k in seconds if catalogs[k] is not None]
    return {"points": points, "seconds": seconds, "ms_per_point": per_point,
            "stop_wait_s": stop_wait,
            "overhead_ms_per_point": ({k: per_point[k] - base for k in with_catalog}
                                      if base is not None else {}),
            "overhead_in_run_ms_per_point": ({k: in_run[k] - base_in_run for k in with_catalog}
                                             if base_in_run is not None else {})}


def write_raster(shape: tuple[int, int], rf_frequency_hz: float, batch_size: int,
                 go: str | Path | None = None, ordered: bool = True,
                 env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One RunEngine writing one locked ``deer_raster`` to the profile's catalog.

    The writer process of the concurrent-writers test and of
    ``python -m benchmarks.catalog write-raster``: devices at
    ``$NVMRI_PREFIX`` (this process's CA environment must reach the IOC), the
    catalog ``$NVMRI_CATALOG`` with ``$NVMRI_API_KEY``, the spool in
    ``$NVMRI_SPOOL``. Prints ``ready`` and waits for the file ``go`` to
    exist, so that several writers start together.

    Parameters
    ----------
    shape : (nx, ny)
        Raster points along x and y (at z = 30 nm), so ``nx * ny`` events.
    rf_frequency_hz : float
        RF carrier, Hz.
    batch_size : int
        Catalog writer batch (events per write).
    go : path, optional
        Start when this file exists (default: at once).
    ordered : bool
        False writes with the stock TiledWriter (reproduces issue #12).
    env : mapping, optional
        Default ``os.environ``.

    Returns
    -------
    dict
        ``{"uids": [...], "spool": path, "errors": [...]}``.
    """
    from bluesky import RunEngine

    from nvmri_bluesky.catalog import default_api_key, default_location, open_catalog
    from nvmri_bluesky.devices import make_devices
    from nvmri_bluesky.profile import bound_plans

    env = dict(os.environ if env is None else env)
    devices = make_devices(env["NVMRI_PREFIX"], connection_timeout=120.0)  # a loaded machine
    RE = RunEngine({})
    catalog = open_catalog(default_location(env), api_key=default_api_key(env))
    try:
        catalog.subscribe(RE, env.get("NVMRI_SPOOL") or None, batch_size=batch_size,
                          ordered=ordered)
        raster = bound_plans(devices, ("deer_raster",))["deer_raster"]
        print("ready", flush=True)
        while go is not None and not Path(go).exists():
            time.sleep(0.01)
        uids = list(RE(raster((-10, 10, shape[0]), (-10, 10, shape[1]), 30.0,
                              rf_frequency_hz)))
        catalog.flush()
        spool = catalog.spool_path(uids[0]) if uids else None
        return {"uids": uids, "spool": str(spool), "errors": catalog.writer_errors}
    finally:
        catalog.close()
        devices.destroy()


# ----------------------------------------------------------------------------- command

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.catalog",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("overhead", help="per-point cost of writing a raster to catalogs "
                                        "(starts a simulated IOC and a PostgreSQL catalog)")
    p.add_argument("--n", type=int, default=8, help="raster points per axis")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--catalog", default=None,
                   help="facility catalog URI (default: start one on fresh databases)")
    p.add_argument("--api-key", default=None)
    p = sub.add_parser("write-raster", help="write one deer_raster to $NVMRI_CATALOG "
                                            "(devices at $NVMRI_PREFIX); prints JSON")
    p.add_argument("--shape", default="50,40", help="nx,ny (default 50,40: 2000 points)")
    p.add_argument("--rf", type=float, default=3.4e9, help="RF carrier, Hz")
    p.add_argument("--batch", type=int, default=None, help="catalog batch size")
    p.add_argument("--go", default=None, help="start when this file exists")
    p.add_argument("--stock-writer", action="store_true",
                   help="the stock TiledWriter (reproduces issue #12)")
    return parser


def _write_raster(args: argparse.Namespace) -> int:
    from nvmri_bluesky.catalog import DEFAULT_BATCH_SIZE

    nx, ny = (int(v) for v in args.shape.split(","))
    result = write_raster((nx, ny), args.rf, args.batch or DEFAULT_BATCH_SIZE,
                          go=args.go, ordered=not args.stock_writer)
    print(json.dumps(result), flush=True)
    return 0


def _overhead(args: argparse.Namespace) -> int:
    """Start an IOC (and a catalog server unless ``--catalog``); print the overhead JSON."""
    from nvmri_bluesky.testing import start_catalog_server, start_simulated_ioc

    server = None
    if args.catalog is None:
        server = start_catalog_server(wait=False)
    ioc = start_simulated_ioc()
    try:
        key = args.api_key
        uri = args.catalog
        if server is not None:
            server.wait_ready()
            uri, key = server.uri, server.create_api_key()
        with tempfile.TemporaryDirectory(prefix="nvmri-overhead-") as tmp:
            result = measure_catalog_overhead(
                ioc.prefix, {"none": None, "embedded": str(Path(tmp) / "catalog"),
                             "postgresql": uri}, api_key=key, n=args.n,
                repeats=args.repeats, spool_dir=Path(tmp) / "spool")
        print(json.dumps(result, indent=1))
    finally:
        ioc.stop()
        if server is not None:
            server.stop(drop=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.catalog {overhead,write-raster}``."""
    args = _parser().parse_args(argv)
    try:
        return _write_raster(args) if args.command == "write-raster" else _overhead(args)
    except NvmriError as err:
        print(f"benchmarks.catalog: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
