"""Benchmark harness behind ``nvmri bench [NAME ...] [--json]``.

Benchmarks live in ``benchmarks/bench_<name>.py`` at the repository root
(next to the package; it is installed editable).  Each module exposes
``run() -> dict | list[dict]``; every dict has the keys ``name``, ``ours``,
``baseline``, ``ratio`` (ours / baseline for times), ``unit`` and ``detail``.
On the command line names use dashes: ``ca-scan`` runs ``bench_ca_scan.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import nvmri_bluesky
from nvmri_bluesky.errors import NvmriError

__all__ = ["KEYS", "benchmarks_dir", "discover", "run"]

KEYS = ("name", "ours", "baseline", "ratio", "unit", "detail")
"""The keys of every benchmark result."""


def benchmarks_dir() -> Path:
    """``<repository>/benchmarks``.

    Raises
    ------
    NvmriError
        If it does not exist (the package is not an editable install of the repository).
    """
    path = Path(nvmri_bluesky.__file__).resolve().parents[1] / "benchmarks"
    if not path.is_dir():
        raise NvmriError(f"benchmarks directory not found at {path}: `nvmri bench` needs the "
                         "package installed editable from its repository (pip install -e .)")
    return path


def discover() -> dict[str, Path]:
    """``{cli-name: module path}`` of every ``benchmarks/bench_*.py``, sorted by name."""
    found = {p.stem[len("bench_"):].replace("_", "-"): p
             for p in benchmarks_dir().glob("bench_*.py")}
    return dict(sorted(found.items()))


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"nvmri_benchmarks.{path.stem}", path)
    if spec is None or spec.loader is None:
        raise NvmriError(f"benchmark {name!r}: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise NvmriError(f"benchmark {name!r}: {path.name} has no run() function")
    return module


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, numpy scalars plain numbers."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, dict):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _results(name: str, raw: Any) -> list[dict[str, Any]]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise NvmriError(f"benchmark {name!r}: run() must return a dict or a list of dicts, "
                             f"got {type(item).__name__}")
        missing = [k for k in KEYS if k not in item]
        if missing:
            raise NvmriError(f"benchmark {name!r}: result lacks {', '.join(missing)}")
        out.append(_finite({k: item[k] for k in KEYS}))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _table(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    cells = [[_fmt(r[k]) for k in KEYS] for r in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(KEYS[:-1])]
    lines = ["  ".join(k.ljust(w) for k, w in zip(KEYS[:-1], widths, strict=True)) + "  detail"]
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c[:-1], widths, strict=True))
                     + "  " + c[-1])
    return "\n".join(lines)


def _prepare_channel_access() -> None:
    """Give this process a pool of private CA ports before any benchmark imports ophyd.

    ``import ophyd`` initialises libca, which reads the EPICS environment
    once; with the pool configured first, every benchmark can start its own
    simulated IOC (:func:`nvmri_bluesky.sim.launch.start_ioc`) in any order.
    """
    from nvmri_bluesky.sim import launch

    if not launch.ca_initialised():
        launch.reserve_ca_ports(4)


def run(names: list[str] | None = None, as_json: bool = False) -> int:
    """Run the named benchmarks (all when ``names`` is empty or None) and print the results.

    Parameters
    ----------
    names : list of str, optional
        Benchmark names with dashes (``ca-scan``); underscores are accepted.
    as_json : bool
        One JSON object per line (keys :data:`KEYS`) instead of a table.

    Returns
    -------
    int
        0 when every benchmark ran, 1 when one failed (its error is printed
        on stderr, one line, and the others still run).

    Raises
    ------
    NvmriError
        Unknown benchmark names, or no benchmarks directory.
    """
    available = discover()
    wanted = [n.replace("_", "-") for n in names] if names else list(available)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise NvmriError(f"unknown benchmark(s) {', '.join(unknown)} "
                         f"(available: {', '.join(available) or 'none'})")
    _prepare_channel_access()
    rows: list[dict[str, Any]] = []
    failed = 0
    for name in wanted:
        t0 = time.perf_counter()
        try:
            results = _results(name, _load(name, available[name]).run())
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            failed += 1
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"nvmri bench: {name} failed: {reason}", file=sys.stderr, flush=True)
            if "--debug" in sys.argv:
                traceback.print_exc()
            continue
        if as_json:
            for r in results:
                print(json.dumps(r), flush=True)
        else:
            rows.extend(results)
            print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if rows and not as_json:
        print(_table(rows), flush=True)
    return 1 if failed else 0
