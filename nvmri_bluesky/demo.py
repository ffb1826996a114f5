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
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError

PAPER_SAMPLES = (("paper-fig2", ("calibration",)),
                 ("paper-fig3-nv1", ("layers",)),
                 ("paper-fig3-nv2", ("layers",)),
                 ("paper-fig4", ("spins",)))
"""The built-in paper scenarios and the protocol steps each one gets."""
ALL_STEPS = ("calibration", "spins", "layers")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _samples(scenario: str | None, prefix: str | None, steps: tuple[str, ...] | None
             ) -> list[tuple[str, tuple[str, ...]]]:
    if scenario is None and prefix is None:
        return [(name, steps or default) for name, default in PAPER_SAMPLES]
    return [(scenario or "instrument", steps or ALL_STEPS)]


def _sample_name(source: str, prefix: str | None) -> str:
    """The scenario's own name (a file's ``name`` field), or the instrument's prefix."""
    if prefix is not None:
        return f"instrument {prefix}"
    from nvmri_bluesky.sim.scenario import load_scenario

    return load_scenario(source).name


def run(scenario: str | None = None, out: str | Path = "nvmri-demo",
        catalog: str | None = None, prefix: str | None = None, api_key: str | None = None,
        quick: bool = False, steps: tuple[str, ...] | None = None) -> dict[str, Any]:
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
        A reduced protocol (fewer, coarser points) for tests.
    steps : tuple of str, optional
        Protocol steps (``calibration``, ``spins``, ``layers``) instead of
        each sample's default.

    Returns
    -------
    dict
        The report (as written to ``OUT/report.json``).
    """
    from nvmri_bluesky.sim import launch

    t0 = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = _samples(scenario, prefix, steps)
    unknown = set(steps or ()) - set(ALL_STEPS)
    if unknown:
        raise NvmriError(f"unknown protocol step(s) {sorted(unknown)}; choose from {ALL_STEPS}")
    if prefix is None:
        launch.reserve_ca_ports()                      # before ophyd is imported
    from nvmri_bluesky.catalog import open_catalog

    location = catalog or str(out / "catalog")
    runs: dict[str, dict[str, str]] = {}
    with open_catalog(location, api_key=api_key) as cat:
        for source, steps in samples:
            name = _sample_name(source, prefix)
            _say(f"== sample {name}: {', '.join(steps)}")
            with ExitStack() as stack:
                sample_prefix = prefix
                if prefix is None:
                    ioc = stack.enter_context(launch.start_ioc(source, time_scale=0.0))
                    sample_prefix = ioc.prefix
                runs[name] = _measure(cat, out, sample_prefix, name, steps, quick)
        _say("== reconstructing from the catalog")
        from nvmri_bluesky.analysis import analyse

        report = analyse(cat, runs, out, location)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    from nvmri_bluesky.analysis import table

    print(table(report))
    _say(f"== wrote {out / 'report.json'} and figures in {out}/ "
         f"({report['elapsed_s']:.0f} s)")
    return report


def _measure(cat: Any, out: Path, prefix: str, name: str, steps: tuple[str, ...],
             quick: bool) -> dict[str, str]:
    """Run the protocol steps on one sample; return {measurement: uid}."""
    from bluesky import RunEngine

    from nvmri_bluesky.callbacks import LiveSlices, Progress
    from nvmri_bluesky.devices import make_devices
    from nvmri_bluesky.plans import protocol

    nv = make_devices(prefix)
    RE = RunEngine({"scenario": name}, call_returns_result=True)
    RE.subscribe(Progress())
    RE.subscribe(LiveSlices(out_dir=out / "live"))
    cat.subscribe(RE, out / "spool")
    uids: dict[str, str] = {}
    try:
        for step in steps:
            plan = protocol.step_plan(step, nv, quick=quick)
            result = RE(plan)
            if result.exit_status != "success":
                raise NvmriError(f"{name}: {step} ended {result.exit_status}: {result.reason}")
            uids.update(result.plan_result or {})
    except KeyboardInterrupt:
        _say(f"interrupted during {name}; runs so far are stored in the catalog")
        raise
    finally:
        cat.flush()
        nv.destroy()
    return uids
