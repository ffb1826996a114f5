"""The stage's motor records as clients other than ophyd see them (pyepics, caput).

Moves take wall time here (``--time-scale`` > 0): at time scale S a move of d
nm at VELO v takes S d / v wall seconds.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

_KEEP: list[Any] = []
"""pyepics objects made here: a PV collected later (``PV.__del__``) can crash libca."""

TIME_SCALE = 2.0
"""Wall s per simulated s: the paper-fig2 stage (1000 nm/s) then moves 500 nm/s."""


@pytest.fixture
def timed(make_ioc: Any) -> tuple[Any, Any]:
    """(IOC handle, devices) of an IOC whose moves take wall time."""
    return make_ioc("paper-fig2", time_scale=TIME_SCALE)


def _motor(handle: Any, axis: str = "X") -> Any:
    import epics

    motor = epics.Motor(handle.pv(f"STAGE:{axis}"), timeout=30.0)
    _KEEP.append(motor)
    assert motor.get("DMOV") == 1
    return motor


def test_epics_motor_move_with_wait_returns_ok_at_dmov_1(timed: Any) -> None:
    handle, _ = timed
    motor = _motor(handle)
    assert motor.get("LVIO") == 0                    # no limit violation at start-up
    start = time.monotonic()
    assert motor.move(100.0, wait=True) == 0         # 0: finished OK (-4 would be LVIO)
    assert time.monotonic() - start >= 0.15          # 100 nm at 500 nm/s: 0.2 s
    assert motor.get("DMOV") == 1
    assert motor.get("RBV") == pytest.approx(100.0)
    assert motor.move(-20.0, relative=True, wait=True) == 0
    assert motor.get("RBV") == pytest.approx(80.0)


def test_caput_with_wait_returns_only_when_the_move_is_done(timed: Any) -> None:
    import epics

    handle, _ = timed
    start = time.monotonic()
    assert epics.caput(handle.pv("STAGE:X.VAL"), 150.0, wait=True, timeout=60) == 1
    elapsed = time.monotonic() - start
    assert epics.caget(handle.pv("STAGE:X.DMOV"), use_monitor=False) == 1
    assert epics.caget(handle.pv("STAGE:X.RBV"), use_monitor=False) == pytest.approx(150.0)
    assert elapsed >= 0.25                           # 150 nm at 500 nm/s: 0.3 s


def test_tweak_moves_by_twv_and_completes(timed: Any) -> None:
    handle, _ = timed
    motor = _motor(handle, "Y")
    motor.put("TWV", 25.0, wait=True)
    before = motor.get("RBV")
    motor.tweak("forward", wait=True)
    assert motor.get("DMOV") == 1
    assert motor.get("RBV") == pytest.approx(before + 25.0)
    motor.tweak("reverse", wait=True)
    motor.tweak("reverse", wait=True)
    assert motor.get("RBV") == pytest.approx(before - 25.0)
    assert motor.get("VAL") == pytest.approx(before - 25.0)


def test_stop_halts_a_move_where_it_is(timed: Any) -> None:
    handle, devices = timed
    motor = _motor(handle)
    motor.move(400.0, wait=False)                    # 0.8 s of motion
    time.sleep(0.3)
    assert motor.get("DMOV") == 0
    motor.stop()
    deadline = time.monotonic() + 30
    while motor.get("DMOV") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    where = motor.get("RBV")
    assert 0.0 < where < 400.0
    assert motor.get("VAL") == pytest.approx(where)
    time.sleep(0.3)
    assert motor.get("RBV") == pytest.approx(where)   # and it stays there
    devices.stage.x.move(where + 10.0, wait=True)     # ophyd moves on afterwards
    assert devices.stage.x.position == pytest.approx(where + 10.0)


def test_spmg_pause_and_go_resume_the_move(timed: Any) -> None:
    import epics

    handle, _ = timed
    pv = handle.pv("STAGE:Z")
    done = threading.Event()

    def move() -> None:
        epics.caput(f"{pv}.VAL", 400.0, wait=True, timeout=60)   # 300 nm: 0.6 s
        done.set()

    thread = threading.Thread(target=move)
    thread.start()
    time.sleep(0.2)
    epics.caput(f"{pv}.SPMG", "Pause", wait=True)
    paused_at = epics.caget(f"{pv}.RBV", use_monitor=False)
    time.sleep(0.3)
    assert epics.caget(f"{pv}.RBV", use_monitor=False) == pytest.approx(paused_at)
    assert epics.caget(f"{pv}.VAL", use_monitor=False) == pytest.approx(400.0)
    epics.caput(f"{pv}.SPMG", "Go", wait=True)
    deadline = time.monotonic() + 30
    while epics.caget(f"{pv}.RBV", use_monitor=False) != pytest.approx(400.0):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    thread.join(30)
    assert done.is_set()
    # Stop: a VAL put does not move until Go
    epics.caput(f"{pv}.SPMG", "Stop", wait=True)
    epics.caput(f"{pv}.VAL", 300.0, wait=True)
    time.sleep(0.2)
    assert epics.caget(f"{pv}.RBV", use_monitor=False) == pytest.approx(400.0)
    epics.caput(f"{pv}.SPMG", "Go", wait=True)
    deadline = time.monotonic() + 30
    while epics.caget(f"{pv}.RBV", use_monitor=False) != pytest.approx(300.0):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_jog_moves_until_released(timed: Any) -> None:
    import epics

    handle, _ = timed
    pv = handle.pv("STAGE:X")
    start = epics.caget(f"{pv}.RBV", use_monitor=False)
    epics.caput(f"{pv}.JVEL", 200.0, wait=True)
    epics.caput(f"{pv}.JOGF", 1, wait=True)
    time.sleep(0.4)
    epics.caput(f"{pv}.JOGF", 0, wait=True)
    stopped = epics.caget(f"{pv}.RBV", use_monitor=False)
    assert start < stopped < start + 200.0           # 200 nm/s for ~0.4 s at scale 2
    assert epics.caget(f"{pv}.DMOV", use_monitor=False) == 1


def test_refused_fields_say_no_and_leave_no_alarm(timed: Any) -> None:
    import epics

    handle, devices = timed
    pv = handle.pv("STAGE:Z")
    hlm, llm = (epics.caget(f"{pv}.{f}", use_monitor=False) for f in ("HLM", "LLM"))
    assert (epics.caget(f"{pv}.DHLM", use_monitor=False),
            epics.caget(f"{pv}.DLLM", use_monitor=False)) == (hlm, llm)
    velocity = epics.caget(f"{pv}.VELO", use_monitor=False)
    rbv = epics.PV(f"{pv}.RBV")
    _KEEP.append(rbv)
    for field, value in (("VELO", 0.0), ("VELO", -100.0), ("VELO", 1e-320), ("LLM", -1e9),
                         ("LLM", hlm + 1.0), ("HOMF", 1), ("HOMR", 1)):
        epics.caput(f"{pv}.{field}", value, wait=True, timeout=30)
        assert epics.caget(f"{pv}.VELO", use_monitor=False) == velocity, field
        assert epics.caget(f"{pv}.LLM", use_monitor=False) == llm, field
        assert rbv.get_with_metadata(form="time", use_monitor=False)["severity"] == 0, field
    devices.stage.z.move(llm + 50.0, wait=True)      # a queued ophyd move still works
    assert devices.stage.z.position == pytest.approx(llm + 50.0)
    epics.caput(f"{pv}.DHLM", hlm - 10.0, wait=True)
    assert epics.caget(f"{pv}.HLM", use_monitor=False) == pytest.approx(hlm - 10.0)


def _caproto_get(handle: Any, *fields: str) -> list[float]:
    """Numeric values of ``fields`` read by caproto's command-line client, a process of its own."""
    import os
    import subprocess
    import sys

    from nvmri_bluesky.sim import launch

    env = {**os.environ, **launch.ioc_env(handle.port),
           "EPICS_CA_ADDR_LIST": f"127.0.0.1:{handle.port}", "EPICS_CA_AUTO_ADDR_LIST": "NO"}
    got = subprocess.run([os.path.join(os.path.dirname(sys.executable), "caproto-get"),
                          *(handle.pv(f) for f in fields)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    return [float(line.split(None, 1)[1].strip("[]")) for line in got.stdout.splitlines()]


def test_soft_limits_and_position_survive_a_restart(make_ioc: Any, tmp_path: Path) -> None:

    autosave = tmp_path / "autosave.json"
    handle, devices = make_ioc("paper-fig2", extra_args=("--autosave", str(autosave)))
    devices.stage.z.low_limit_travel.set(12.0).wait(30)
    devices.stage.x.move(33.0, wait=True)
    prefix, port = handle.prefix, handle.port
    handle.stop()
    saved = json.loads(autosave.read_text())
    assert saved["z"]["llm"] == 12.0 and saved["x"]["position"] == 33.0
    again, _ = make_ioc("paper-fig2", prefix=prefix, port=port, connect=False,
                        extra_args=("--autosave", str(autosave)))
    # a fresh client (this process's libca only slowly re-finds channels of the old server)
    assert _caproto_get(again, "STAGE:Z.LLM", "STAGE:X.RBV", "STAGE:X.VAL") == [12.0, 33.0, 33.0]
