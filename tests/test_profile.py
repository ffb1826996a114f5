"""``profile_collection`` in a fresh interpreter against the simulated IOC.

The startup files run in order in one namespace (as IPython runs a
profile's ``startup/*.py``) in a subprocess whose only Channel Access
configuration is its environment, as a user's shell would give it (README):
the IOC's loopback search port, no auto address list, and a repeater port
(this test process's private repeater, where the IOC sends its beacons, so
the client does not spawn a ``caRepeater``).  The session then runs the bound
plans; afterwards the catalog is opened here and must hold the runs, and the
live slice of the raster must have been written as a PNG.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nvmri_bluesky.sim import launch

REPO = Path(__file__).resolve().parents[1]
STARTUP = REPO / "profile_collection" / "startup"
SCENARIO = "paper-fig2"
SESSION_TIMEOUT_S = 200.0
"""Longest wait for the session to run the startup files and both plans, s."""
EXIT_GRACE_S = 20.0
"""Time the interpreter gets to exit after the session's last statement, s."""

RUNNER = r'''
import json, sys
from pathlib import Path

namespace = {"__name__": "__main__"}
for path in sorted(Path(sys.argv[1]).glob("*.py")):          # 00-base.py ... 90-summary.py
    exec(compile(path.read_text(), str(path), "exec"), namespace)
args = json.loads(sys.argv[2])
RE, callbacks = namespace["RE"], namespace["callbacks"]
odmr = RE(namespace["odmr_sweep"](**args["odmr"]))
raster = RE(namespace["deer_raster"](**args["raster"]))
print("RESULT " + json.dumps({
    "odmr": list(odmr), "raster": list(raster), "state": RE.state,
    "callbacks": sorted(callbacks),
    "saved": [str(p) for p in getattr(callbacks.get("slices"), "saved", [])],
    "catalog_errors": callbacks["catalog"].writer_errors if "catalog" in callbacks else None,
}), flush=True)
'''


def _client_env(port: int, tmp: Path) -> dict[str, str]:
    """A client process's environment: CA pointed at ``port`` on loopback, the profile's vars."""
    server = launch.ioc_env(port)            # the IOC's CA variables, client ones included
    env = {k: v for k, v in server.items() if not k.startswith("EPICS_CAS_")}
    env.update({
        "EPICS_CA_ADDR_LIST": launch.LOOPBACK,
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(port),
        "MPLBACKEND": "Agg",
        "NVMRI_LIVE": "1",
        "NVMRI_CATALOG": str(tmp / "catalog"),
        "NVMRI_FIGURES": str(tmp / "figures"),
        "NVMRI_SCENARIO": SCENARIO,
        "PYTHONUNBUFFERED": "1",
    })
    if "EPICS_CAS_BEACON_PORT" in server:     # this process's private CA repeater
        env["EPICS_CA_REPEATER_PORT"] = server["EPICS_CAS_BEACON_PORT"]
    for key in ("NVMRI_ZMQ", "NVMRI_API_KEY", "NVMRI_SPOOL"):
        env.pop(key, None)
    return env


def _run_session(cmd: list[str], tmp: Path, env: dict[str, str]
                 ) -> tuple[int | None, str, str, bool]:
    """Run the session; (returncode, stdout, stderr, exited by itself).

    Waits for its ``RESULT`` line (at most SESSION_TIMEOUT_S), then EXIT_GRACE_S for
    the interpreter to exit; a session that does not is killed.
    """
    out_path, err_path = tmp / "session.out", tmp / "session.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err)
        deadline = time.monotonic() + SESSION_TIMEOUT_S
        while (proc.poll() is None and time.monotonic() < deadline
               and b"\nRESULT " not in b"\n" + out_path.read_bytes()):
            time.sleep(0.2)
        try:
            proc.wait(EXIT_GRACE_S)
            exited = True
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            exited = False
    return (proc.returncode, out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"), exited)


@pytest.mark.timeout(300)
def test_profile_startup_runs_plans_into_catalog_and_live_slices(tmp_path: Path) -> None:
    from nvmri_bluesky import physics
    from nvmri_bluesky.catalog import open_catalog
    from nvmri_bluesky.reconstruct.runs import load_run

    assert [p.name for p in sorted(STARTUP.glob("*.py"))][0] == "00-base.py"
    with launch.start_ioc(SCENARIO, time_scale=0.0, configure_client=False) as ioc:
        inst = ioc.scenario.instrument()
        f_here = float(inst.f_nv(np.array(ioc.scenario.stage.start_nm, float)))
        f_corner = float(inst.f_nv(np.array([-2.0, -2.0, 40.0])))
        args = {
            "odmr": {"start_hz": f_here - 10e6, "stop_hz": f_here + 10e6, "num": 11,
                     "shots": 500_000},
            "raster": {"x": [-2.0, 2.0, 3], "y": [-2.0, 2.0, 3], "z": 40.0,
                       "rf_frequency_hz": inst.f_dark0, "tau_s": 2e-6,
                       "mw_frequency_hz": f_corner, "shots": 200_000},
        }
        (tmp_path / "runner.py").write_text(RUNNER)
        env = _client_env(ioc.port, tmp_path)
        env["NVMRI_PREFIX"] = ioc.prefix
        returncode, out, err, exited = _run_session(
            [sys.executable, str(tmp_path / "runner.py"), str(STARTUP), json.dumps(args)],
            tmp_path, env)
    assert "RESULT " in out and (returncode == 0 or not exited), (
        f"profile session failed ({returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(next(line[7:] for line in out.splitlines()
                                             if line.startswith("RESULT ")))
    # what 90-summary.py printed
    assert f"instrument at prefix {ioc.prefix!r}" in out
    assert result["callbacks"] == ["catalog", "progress", "slices"]
    assert result["state"] == "idle"
    assert result["catalog_errors"] == []
    (odmr_uid,), (raster_uid,) = result["odmr"], result["raster"]

    # the live slice of the raster, written when the run stopped
    png = tmp_path / "figures" / f"deer_raster_{raster_uid[:8]}.png"
    assert png.is_file(), sorted(p.name for p in (tmp_path / "figures").glob("*"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    # the ODMR sweep draws its spectrum too (LiveSlices' 1D sweep mode)
    odmr_png = tmp_path / "figures" / f"odmr_sweep_{odmr_uid[:8]}.png"
    assert odmr_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["saved"] == [str(odmr_png), str(png)]

    # the catalog, opened afterwards from this process
    with open_catalog(tmp_path / "catalog", create=False) as catalog:
        rows = {row.uid: row for row in catalog.runs()}
        assert {odmr_uid, raster_uid} <= set(rows), sorted(rows)
        assert (rows[odmr_uid].plan, rows[odmr_uid].points, rows[odmr_uid].status) == (
            "odmr_sweep", 11, "success")
        assert (rows[raster_uid].plan, rows[raster_uid].points, rows[raster_uid].status) == (
            "deer_raster", 9, "success")
        assert rows[raster_uid].scenario == SCENARIO          # RE.md from 00-base.py
        odmr = load_run(catalog, odmr_uid, plans=["odmr_sweep"])
        raster = load_run(catalog, raster_uid, plans=["deer_raster"])
    ratio = np.asarray(odmr["cw_0"] / odmr["cw_1"], float)
    f_dip = float(np.asarray(odmr["mw_frequency"])[np.argmin(ratio)])
    assert abs(f_dip - f_here) <= 1e6                          # a 2 MHz grid around f_nv
    assert raster.attrs["complete"] and raster.attrs["points_measured"] == 9
    locked = np.asarray(raster["lock_frequency"].transpose("x", "y", "z"), float)[..., 0]
    xs, ys = np.asarray(raster["x"], float), np.asarray(raster["y"], float)
    truth = np.array([[inst.f_nv(np.array([x, y, 40.0])) for y in ys] for x in xs])
    assert np.max(np.abs(locked - truth)) < 0.1 / physics.Instrument().tau_cw_s
    # ... and the session ends when its last statement is done (as IPython's `exit` needs)
    assert exited, (f"the profile session did not exit within {EXIT_GRACE_S:.0f} s of its "
                    "last statement (killed): a non-daemon thread is left running")
