"""ca-scan: per-point time of a stage scan read over Channel Access, beside bare bluesky.

Ours: ``bluesky.plans.scan([counter], stage.x, 0, 999, 1000)`` against the
simulated IOC (subprocess, time-scale 0) through pyepics/ophyd: every point
is a motor move (put + DMOV), one acquisition (put-completion + counts
monitor) and an event.  Baseline: the same scan over ``ophyd.sim`` ``motor``
and ``det`` in the same process and RunEngine.  ratio = ours / baseline.

The detail also gives median latencies measured outside the RunEngine: a
put-completion round trip (``PG:SHOTS``), a motor move to completion, one
acquisition trigger, a readback-checked MW frequency set, and a ``read()``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

POINTS = 1000
LATENCY_REPEATS = 200


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _latencies(devices: Any) -> dict[str, float]:
    from nvmri_bluesky import pulses

    devices.pulser.load(pulses.cw_odmr())
    devices.pulser.shots.set(100).wait(5)
    x = devices.stage.x
    return {
        "put_complete_ms": _median_ms(
            lambda i: devices.pulser.shots.set(100 + i % 2).wait(5), LATENCY_REPEATS),
        "motor_move_ms": _median_ms(lambda i: x.set(float(i % 50)).wait(5), LATENCY_REPEATS),
        "trigger_ms": _median_ms(lambda i: devices.counter.trigger().wait(5), LATENCY_REPEATS),
        "mw_set_ms": _median_ms(
            lambda i: devices.mw.frequency.set(6.2e9 + 1e3 * i).wait(5), LATENCY_REPEATS),
        "read_us": 1e3 * _median_ms(lambda i: devices.counter.read(), LATENCY_REPEATS),
    }


def _timed(RE: Any, plan: Any) -> float:
    t0 = time.perf_counter()
    RE(plan)
    return time.perf_counter() - t0


def run() -> dict[str, Any]:
    """Time both scans; return ``{name, ours, baseline, ratio, unit, detail}`` (ms/point)."""
    from nvmri_bluesky.sim.launch import start_ioc

    # the IOC first: it configures Channel Access, which importing ophyd fixes
    with start_ioc("default", time_scale=0.0) as ioc:
        import bluesky.plans as bp
        from bluesky import RunEngine
        from ophyd.sim import det, motor

        from nvmri_bluesky import pulses
        from nvmri_bluesky.devices import make_devices

        devices = make_devices(ioc.prefix)
        try:
            RE = RunEngine({})
            devices.pulser.load(pulses.cw_odmr())
            devices.pulser.shots.set(100).wait(5)
            lat = _latencies(devices)
            RE(bp.scan([devices.counter], devices.stage.x, 0, 9, 10))        # warm-up
            RE(bp.scan([det], motor, 0, 9, 10))
            ours = _timed(RE, bp.scan([devices.counter], devices.stage.x, 0, POINTS - 1, POINTS))
            base = _timed(RE, bp.scan([det], motor, 0, POINTS - 1, POINTS))
        finally:
            devices.destroy()
    ours_ms, base_ms = 1e3 * ours / POINTS, 1e3 * base / POINTS
    return {
        "name": "ca-scan",
        "ours": ours_ms,
        "baseline": base_ms,
        "ratio": ours_ms / base_ms,
        "unit": "ms/point",
        "detail": {"points": POINTS, "ours_total_s": ours, "baseline_total_s": base, **lat,
                   "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]},
    }
