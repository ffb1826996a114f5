"""``nvmri validate``'s runner: the default protocol on random samples, graded.

:func:`run` writes each sample's scenario file and runs the command a user
types, ``nvmri demo --scenario FILE --out DIR``, in a subprocess (the demo
starts its own IOC on its own Channel Access port), then grades
``DIR/report.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.validate.generator import Truth, draw_sample
from nvmri_bluesky.validate.grader import grade_sample, summarise
from nvmri_bluesky.validate.text import number_text, table

__all__ = ["nvmri_command", "run_sample", "run"]



def nvmri_command() -> str:
    """The ``nvmri`` console script of this environment (beside the interpreter)."""
    beside = Path(sys.executable).with_name("nvmri")
    found = str(beside) if beside.exists() else shutil.which("nvmri")
    if not found:
        raise NvmriError("validate: the `nvmri` command is not installed next to "
                         f"{sys.executable} nor on PATH")
    return found


def _ca_env() -> dict[str, str]:
    """This environment with Channel Access on loopback only (the demo picks its ports)."""
    return {**os.environ, "EPICS_CA_ADDR_LIST": "127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST": "NO"}


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


_RUNNING: set[subprocess.Popen] = set()
"""The demos running now (stopped if ``nvmri validate`` is interrupted)."""


def _stop(proc: subprocess.Popen) -> None:
    """Stop a demo that ran out of time: Ctrl-C (it closes its IOC), then kill."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_sample(truth: Truth, workdir: Path, timeout_s: float | None = None,
               command: str | None = None) -> dict[str, Any]:
    """Write the sample's scenario file, run ``nvmri demo --scenario FILE --out DIR``, grade.

    Parameters
    ----------
    truth : Truth
    workdir : Path
        ``workdir/seed-NNNN/`` gets ``scenario.json``, ``demo/`` (the demo's
        ``--out``), ``stdout.txt``, ``stderr.txt`` and ``grade.json`` (the result).
    timeout_s : float, optional
        Stop the demo (Ctrl-C, then kill) after this many seconds.
    command : str, optional
        The ``nvmri`` executable (default :func:`nvmri_command`).

    Returns
    -------
    dict
        :func:`grade_sample`'s result, plus ``returncode`` and ``dir``.
    """
    from nvmri_bluesky.sim.scenario import load_scenario

    here = Path(workdir) / f"seed-{truth.seed:04d}"
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    scenario = here / "scenario.json"
    scenario.write_text(json.dumps(truth.scenario(), indent=2))
    load_scenario(scenario)                          # the loader validates what we wrote
    out = here / "demo"
    cmd = [command or nvmri_command(), "demo", "--scenario", str(scenario), "--out", str(out)]
    t0 = time.monotonic()
    with open(here / "stdout.txt", "w") as so, open(here / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=_ca_env(), cwd=here)
        _RUNNING.add(proc)
        try:
            returncode: int | None = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            returncode = None
        finally:
            _RUNNING.discard(proc)
    wall = time.monotonic() - t0
    report = _read_report(out / "report.json") if returncode == 0 else None
    stderr = (here / "stderr.txt").read_text(errors="replace")
    graded = grade_sample(truth, returncode, report, stderr, wall_s=round(wall, 1))
    if returncode is None:
        graded["causes"] = [f"timed out after {timeout_s:.0f} s (stopped)"]
    graded = {**graded, "returncode": returncode, "dir": str(here)}
    (here / "grade.json").write_text(json.dumps(graded, indent=2))
    return graded


def _progress(done: int, total: int, result: Mapping[str, Any]) -> None:
    first = result["causes"][0] if result["causes"] else ""
    more = f" (+{len(result['causes']) - 1} more)" if len(result["causes"]) > 1 else ""
    print(f"[{done}/{total}] seed {result['seed']} ({result['kind']}): "
          f"{result['status'].upper()} in {number_text(result.get('wall_s'))} s"
          + (f": {first}{more}" if first else ""), file=sys.stderr, flush=True)


def _interrupt(futures: Sequence[Any]) -> None:
    """Ctrl-C: drop the samples not started, stop the running demos (each closes its IOC)."""
    for f in futures:
        f.cancel()
    print("validate: interrupted; stopping the running demos", file=sys.stderr, flush=True)
    for proc in list(_RUNNING):
        if proc.poll() is None:
            _stop(proc)


def run(seeds: int, jobs: int = 1, as_json: bool = False, out: str | Path = "nvmri-validate",
        start: int = 0, timeout_s: float | None = None) -> dict[str, Any]:
    """``nvmri validate``: run and grade seeds ``start .. start + seeds - 1``; print the result.

    Parameters
    ----------
    seeds : int
        Number of samples.
    jobs : int
        Samples run at once (each demo is its own process with its own IOC).
    as_json : bool
        Print JSON (``{"samples": [...], "summary": {...}}``) instead of the table.
    out : path
        Working directory (one sub-directory per sample, and ``validate.json``).
    start : int
        First seed.
    timeout_s : float, optional
        Per-sample time limit, s.

    Returns
    -------
    dict
        ``{"samples": [...], "summary": {...}}`` (also written to ``OUT/validate.json``).
    """
    if seeds < 1 or jobs < 1:
        raise NvmriError(f"--seeds and --jobs must be >= 1 (got {seeds}, {jobs})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truths = [draw_sample(s) for s in range(start, start + seeds)]
    command = nvmri_command()
    print(f"validate: {seeds} samples, {jobs} at once, in {out}/", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_sample, t, out, timeout_s, command) for t in truths]
        try:
            for future in as_completed(futures):
                results.append(future.result())
                _progress(len(results), seeds, results[-1])
        except KeyboardInterrupt:
            _interrupt(futures)
            raise
    results.sort(key=lambda r: r["seed"])
    result = {"samples": results, "summary": summarise(results)}
    (out / "validate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if as_json else table(results, result["summary"]))
    return result
