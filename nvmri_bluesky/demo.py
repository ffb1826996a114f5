"""``nvmri demo``: the paper's experiment end to end, stored and reconstructed.

For every sample (a scenario served by its own simulated IOC, or a running
instrument given by its PV prefix) the protocol plans of
:mod:`nvmri_bluesky.plans.protocol` run on a RunEngine whose documents go to
the catalog (and a spool), the live slices (PNG files) and a progress line.
Then everything is reconstructed from the catalog alone
(:mod:`nvmri_bluesky.analysis`) into ``report.json``, figures, and a table of
the paper's values beside the measured ones.

Channel Access is configured (a private loopback port) before anything
imports ophyd: libca reads its environment once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError

PAPER_SAMPLES = (("paper-fig2", ("calibration",)),
                 ("paper-fig3-nv1", ("sample",)),
                 ("paper-fig3-nv2", ("sample",)),
                 ("paper-fig4", ("sample",)))
"""The built-in paper scenarios and the protocol steps each one gets."""
ALL_STEPS = ("calibration", "sample", "spins", "layers", "adaptive")
SINGLE_SPIN_SAMPLES = ("paper-fig4",)
"""The built-in samples whose spins ``--adaptive`` measures adaptively (one point spin)."""
DEFAULT_STEPS = ("calibration", "sample")
"""What a scenario file gets: the Fig. 2 calibration, then the protocol that decides
from the data what the sample holds (``plans.protocol.any_sample``)."""
STEP_COST = {"calibration": 1, "layers": 3, "spins": 4, "sample": 5, "adaptive": 3}
"""Relative wall time of the protocol steps (to start the longest samples first)."""
WORKER_PRELOAD = ("nvmri_bluesky.analysis.sample", "nvmri_bluesky.figures",
                  "nvmri_bluesky.reconstruct.localize", "nvmri_bluesky.reconstruct.evidence",
                  "nvmri_bluesky.catalog", "nvmri_bluesky.callbacks", "nvmri_bluesky.run_engine",
                  "nvmri_bluesky.plans.accounting", "bluesky", "bluesky_tiled_plugins",
                  "tiled.client", "matplotlib.backends.backend_agg", "scipy.stats")
"""Modules the demo's workers import, none of them a Channel Access client (ophyd,
pyepics): the fork server imports them once before it forks the workers."""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _samples(scenario: str | None, prefix: str | None, steps: tuple[str, ...] | None,
             adaptive: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """(sample, steps) to run; ``adaptive``: the single-spin samples' (and a given
    scenario's) ``sample``/``spins`` step becomes ``adaptive``."""
    def swap(name: str, chosen: tuple[str, ...]) -> tuple[str, ...]:
        if not adaptive or (scenario is None and prefix is None
                            and name not in SINGLE_SPIN_SAMPLES):
            return chosen
        return tuple("adaptive" if s in ("sample", "spins") else s for s in chosen)

    if scenario is None and prefix is None:
        return [(name, swap(name, steps or default)) for name, default in PAPER_SAMPLES]
    name = scenario or "instrument"
    return [(name, swap(name, steps or DEFAULT_STEPS))]


def _sample_name(source: str, prefix: str | None) -> str:
    """The scenario's own name (a file's ``name`` field), or the instrument's prefix."""
    if prefix is not None:
        return f"instrument {prefix}"
    from nvmri_bluesky.sim.scenario import load_scenario

    return load_scenario(source).name


def run(scenario: str | None = None, out: str | Path = "nvmri-demo",
        catalog: str | None = None, prefix: str | None = None, api_key: str | None = None,
        quick: bool = False, steps: tuple[str, ...] | None = None,
        jobs: int = 4, adaptive: bool = False) -> dict[str, Any]:
    """Run the protocol on every sample, reconstruct from the catalog, write the report.

    Parameters
    ----------
    scenario : str, optional
        Built-in scenario name or scenario file; default: the paper's samples.
    out : path
        Output directory (report.json, figures, the embedded catalog).
    catalog : str, optional
        Catalog directory or facility URI (default ``OUT/catalog``).
    prefix : str, optional
        PV prefix of a running instrument; default: start the simulator.
    api_key : str, optional
        API key of a facility catalog.
    quick : bool
        A reduced protocol (fewer points) for tests.
    steps : tuple of str, optional
        Protocol steps (``calibration``, ``sample``, ``spins``, ``layers``)
        instead of each sample's default (:data:`DEFAULT_STEPS`).
    jobs : int
        Samples measured and reconstructed at once, each in a process of its
        own with its own simulated IOC (the paper's samples are independent
        instruments); 1 runs them one after the other in this process.
    adaptive : bool
        Single spins by the adaptive protocol (``plans.adaptive.adaptive_spin``):
        the single-spin samples' ``sample`` or ``spins`` step becomes ``adaptive``.

    Returns
    -------
    dict
        The report (as written to ``OUT/report.json``).
    """
    t0 = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = _samples(scenario, prefix, steps, adaptive)
    unknown = set(steps or ()) - set(ALL_STEPS)
    if unknown:
        raise NvmriError(f"unknown protocol step(s) {sorted(unknown)}; choose from {ALL_STEPS}")
    if jobs < 1:
        raise NvmriError(f"jobs must be at least 1, not {jobs}")
    if prefix is None:
        from nvmri_bluesky.sim import launch

        launch.reserve_ca_ports()                      # before ophyd is imported
    from nvmri_bluesky.catalog import open_catalog

    location = catalog or str(out / "catalog")
    with open_catalog(location, api_key=api_key) as cat:
        # workers write to the same catalog: the embedded server's URI with its key
        common = dict(catalog=cat.server.uri_with_key if cat.server is not None else location,
                      api_key=api_key, out=out, prefix=prefix, quick=quick,
                      shared_terminal=jobs > 1)
        if jobs == 1 or len(samples) == 1:
            parts = dict(_sample(source, steps, **common) for source, steps in samples)
        else:
            parts = _in_parallel(samples, common, jobs)
    from nvmri_bluesky.analysis.sample import merge
    from nvmri_bluesky.analysis.text import table

    report = merge(parts, location)
    report["not_done"] = [entry for part in parts.values() for entry in part.get("not_done", [])]
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    for entry in report["not_done"]:
        _say(f"== not done: {entry['sample']} {entry['step']}: {entry['reason']}")
    _say(f"== wrote {out / 'report.json'} and figures in {out}/ "
         f"({report['elapsed_s']:.0f} s)")
    return report


def _in_parallel(samples: list[tuple[str, tuple[str, ...]]], common: dict[str, Any],
                 jobs: int) -> dict[str, dict[str, Any]]:
    """:func:`_sample` of every (source, steps) in ``jobs`` fresh processes; sample -> part."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # not fork: each worker configures Channel Access before importing ophyd.  A
    # fork server imports the heavy CA-free modules once for all workers (each
    # spawned worker spent ~3 CPU-s importing them)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    # the longest protocols first, so the workers finish together
    order = sorted(range(len(samples)),
                   key=lambda i: -sum(STEP_COST[step] for step in samples[i][1]))
    # workers log like this process (the CLI quiets bluesky's tracebacks unless --debug)
    level = logging.getLogger("bluesky").level
    try:
        with ProcessPoolExecutor(min(jobs, len(samples)), mp_context=context,
                                 initializer=_worker_init, initargs=(level, os.getpid())) as pool:
            futures = {i: pool.submit(_sample_in_worker, *samples[i], **common) for i in order}
            try:
                return dict(futures[i].result() for i in range(len(samples)))
            except KeyboardInterrupt:
                for f in futures.values():
                    f.cancel()
                _say("interrupted; runs so far are stored in the catalog")
                raise
    finally:
        _stop_fork_server()


def _stop_fork_server() -> None:
    """End the fork server and wait for it (its workers have ended), so that nothing
    outlives the demo and the workers' CPU time counts as this process's children's
    (``/usr/bin/time``, ``resource.getrusage``)."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)     # CPython 3.11-3.13
    if stop is not None:
        stop()


def _worker_init(level: int, main_pid: int) -> None:
    """A worker logs like the main process and ends like it: on SIGTERM, or when it dies."""
    from nvmri_bluesky.interrupts import end_with, handle_sigterm

    logging.getLogger("bluesky").setLevel(level)
    handle_sigterm()
    end_with(main_pid)          # its parent is the fork server, not the main process


def _sample_in_worker(*args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """:func:`_sample` in a worker process, which ends (not takes the next sample) on SIGTERM."""
    from nvmri_bluesky.interrupts import terminated

    try:
        return _sample(*args, **kwargs)
    finally:
        if terminated():              # runs closed and IOC stopped by now
            os._exit(128 + signal.SIGTERM)


def _sample(source: str, steps: tuple[str, ...], *, catalog: str, api_key: str | None,
            out: Path, prefix: str | None, quick: bool, shared_terminal: bool
            ) -> tuple[str, dict[str, Any]]:
    """Measure one sample (its own simulated IOC unless ``prefix``) and reconstruct it.

    Returns
    -------
    (str, dict)
        The sample's name and its partial report (:func:`analysis.sample.analyse_sample`).
    """
    from nvmri_bluesky.sim import launch

    if prefix is None:
        launch.reserve_ca_ports()                      # before ophyd is imported
    from nvmri_bluesky.analysis.sample import analyse_sample
    from nvmri_bluesky.catalog import open_catalog

    name = _sample_name(source, prefix)
    _say(f"== sample {name}: {', '.join(steps)}")
    with open_catalog(catalog, api_key=api_key) as cat:
        with ExitStack() as stack:
            sample_prefix = prefix
            if prefix is None:
                ioc = stack.enter_context(launch.start_ioc(source, time_scale=0.0))
                sample_prefix = ioc.prefix
            t0 = time.monotonic()
            uids, not_done = _measure(cat, out, sample_prefix, name, steps, quick,
                                      shared_terminal)
            wall_s = round(time.monotonic() - t0, 1)
        try:
            with cat.remembering_documents():        # each run read once: verified, then used
                _check_stored(cat, out / "spool", uids.values(), name)
                _say(f"== {name}: reconstructing from the catalog")
                part = analyse_sample(cat, name, uids, out)
        except NvmriError as error:        # the other samples are still reported
            _say(f"== {name}: reconstruction not done: {error}")
            part = {"runs": {f"{name}/{m}": u for m, u in uids.items()}}
            not_done.append({"sample": name, "step": "reconstruction", "reason": str(error)})
        part["sample_wall_s"] = {name: wall_s}
        if not_done:
            part["not_done"] = not_done
        return name, part


def _check_stored(cat: Any, spool: Path, uids: Any, name: str) -> None:
    """Every run of the sample in the catalog equal to its spool (rewritten from it if not)."""
    from nvmri_bluesky.catalog import find_spool, repair_from_spool

    for uid in uids:
        ok, account = repair_from_spool(cat, find_spool(uid, [spool]))
        if account:
            _say(f"== {name}: {account}")
        if not ok:
            raise NvmriError(f"{name}: {account}")


def _measure(cat: Any, out: Path, prefix: str, name: str, steps: tuple[str, ...],
             quick: bool, shared_terminal: bool = False
             ) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Run the protocol steps on one sample.

    A step that fails with a one-line reason (e.g. a frequency lock that could
    not follow: its run's stop document says where) is reported as not done
    and the next step runs.

    Returns
    -------
    (dict, list)
        {measurement: uid} of the steps done; [{sample, step, reason}] of the others.
    """
    from bluesky.utils import RunEngineInterrupted

    from nvmri_bluesky.callbacks import LiveSlices, Progress
    from nvmri_bluesky.devices import make_devices
    from nvmri_bluesky.interrupts import reason
    from nvmri_bluesky.plans import protocol
    from nvmri_bluesky.plans.accounting import InstrumentClock
    from nvmri_bluesky.run_engine import RunEngine, install_suspenders

    nv = make_devices(prefix)
    RE = RunEngine({"scenario": name}, call_returns_result=True)
    InstrumentClock(nv).attach(RE)                     # first: every stop carries the time
    progress = (Progress(label=name, interval_s=5.0, inline=False) if shared_terminal
                else Progress())
    RE.subscribe(progress)
    install_suspenders(RE, nv.health, notify=progress.note)
    RE.subscribe(LiveSlices(out_dir=out / "live" / name))
    cat.subscribe(RE, out / "spool")
    uids: dict[str, str] = {}
    not_done: list[dict[str, str]] = []
    try:
        for step in steps:
            plan = protocol.step_plan(step, nv, quick=quick)
            try:
                result = RE(plan)
                if result.exit_status != "success":
                    raise NvmriError(f"{step} ended {result.exit_status}: {result.reason}")
            except RunEngineInterrupted:      # Ctrl-C paused the run: close it, keep its data
                RE.abort(reason())
                raise KeyboardInterrupt from None
            except NvmriError as error:
                _say(f"== {name}: {step} not done: {error}")
                not_done.append({"sample": name, "step": step, "reason": str(error)})
                continue
            uids.update(result.plan_result or {})
            for why in getattr(result.plan_result, "not_done", ()):   # a part of the step
                _say(f"== {name}: {step}: not done: {why}")
                not_done.append({"sample": name, "step": step, "reason": why})
    except KeyboardInterrupt:
        _say(f"interrupted during {name}; runs so far are stored in the catalog")
        raise
    finally:
        cat.flush()
        nv.destroy()
    return uids, not_done
