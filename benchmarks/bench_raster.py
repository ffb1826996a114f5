"""raster: per-point time of a locked 3D ``deer_raster`` beside a bare ``grid_scan``.

Ours: :func:`nvmri_bluesky.plans.deer_raster` over a 3D tip grid against the
simulated IOC (subprocess, time-scale 0, scenario ``paper-fig4``): every point
is a checkpoint, a move of the axes that change, the frequency lock
(predicted MW frequency, one acquisition of the DEER + lock program, a
re-centre and re-trigger only when the residual exceeds the tolerance) and one
event with counts, lock and DEER readings.  A document spool and an embedded
tiled catalog are not subscribed here (see ``docs/deployment.md`` for their
cost).  Baseline: ``bluesky.plans.grid_scan`` over ``ophyd.sim`` motors and
``det`` with the same shape, in the same process and RunEngine.
The baseline runs just before and just after ours and the two are averaged
(the machine's load may change during the run).  ratio = ours / baseline
(target <= 2).
"""

from __future__ import annotations

import os
import time
from typing import Any

SHAPE = (4, 15, 15)  # z, y, x: 900 points


def _timed(RE: Any, plan: Any) -> float:
    t0 = time.perf_counter()
    RE(plan)
    return time.perf_counter() - t0


def run() -> dict[str, Any]:
    """Time both rasters; return ``{name, ours, baseline, ratio, unit, detail}`` (ms/point)."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from ophyd.sim import det, motor1, motor2, motor3

    from nvmri_bluesky import plans
    from nvmri_bluesky.devices import make_devices
    from nvmri_bluesky.sim.launch import start_ioc

    nz, ny, nx = SHAPE
    n = nz * ny * nx
    with start_ioc("paper-fig4", time_scale=0.0) as ioc:
        nv = make_devices(ioc.prefix)
        try:
            RE = RunEngine({})
            events: list[dict] = []
            RE.subscribe(lambda name, doc: events.append(doc) if name == "event" else None)
            f_dark0 = ioc.scenario.instrument().f_dark0
            raster = dict(x=(-6, 6, nx), y=(-6, 6, ny), z=(30, 33, nz),
                          rf_frequency_hz=f_dark0 + 120e6, tau_s=8e-6)
            RE(plans.deer_raster(nv, **{**raster, "x": (-1, 1, 3), "y": (-1, 1, 3),
                                        "z": 30.0}))            # warm-up: caches, program

            def baseline() -> float:
                return _timed(RE, bp.grid_scan([det], motor3, 30, 33, nz, motor2, -6, 6, ny,
                                               motor1, -6, 6, nx, snake_axes=True))

            # the baseline runs before and after ours and the two are averaged, so
            # that a change of the machine's load during the run biases the ratio less
            base_before = baseline()
            events.clear()
            acq0 = nv.counter.acq_id.get()
            ours = _timed(RE, plans.deer_raster(nv, **raster))
            triggers = int(nv.counter.acq_id.get() - acq0)
            n_events = len(events)       # ours only: the baseline's events come next
            reacq = events[-1]["data"]["lock_reacquisitions"] if events else 0
            base_after = baseline()
        finally:
            nv.destroy()
    base = (base_before + base_after) / 2
    ours_ms, base_ms = 1e3 * ours / n, 1e3 * base / n
    return {"name": "raster", "ours": round(ours_ms, 3), "baseline": round(base_ms, 3),
            "ratio": round(ours_ms / base_ms, 2), "unit": "ms/point",
            "detail": {"points": n, "shape_zyx": list(SHAPE), "events": n_events,
                       "acquisitions": triggers, "lock_reacquisitions": reacq,
                       "ours_total_s": round(ours, 2),
                       "baseline_total_s": [round(base_before, 2), round(base_after, 2)],
                       "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}}
