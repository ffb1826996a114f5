"""Issue 13: reasons reach the catalog, suspenders keep faulty points out, SIGTERM cleans up."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from bluesky.utils import RunEngineInterrupted

from nvmri_bluesky import pulses
from nvmri_bluesky.errors import NvmriError


def _frequency_scan(devices: Any, n: int, per_step: Any = None) -> Any:
    """A CW frequency scan of ``n`` points (one acquisition each)."""
    devices.pulser.load(pulses.cw_odmr((0.0,)))
    yield from bps.mv(devices.pulser.shots, 200, devices.mw.output, "On")
    f0 = devices.mw.frequency.get()
    return (yield from bp.scan([devices.counter], devices.mw.frequency, f0, f0 + 1e7, n,
                               per_step=per_step))


def _stop_reason(catalog: Path, uid: str) -> dict:
    from nvmri_bluesky.catalog import open_catalog

    with open_catalog(catalog) as cat:
        return dict(cat.run(uid).metadata["stop"])


def _kill_at(step_no: int, action: Any) -> Any:
    steps = []

    def per_step(detectors, step, pos_cache):
        steps.append(step)
        if len(steps) == step_no:
            action()
        yield from bps.one_nd_step(detectors, step, pos_cache)

    return per_step


def test_the_stop_reason_of_an_ioc_kill_names_the_lost_pv(make_ioc: Any, nvRE: Any,
                                                          tmp_path: Path) -> None:
    from nvmri_bluesky.catalog import open_catalog

    handle, devices = make_ioc("paper-fig2")
    uids: list[str] = []
    nvRE.subscribe(lambda name, doc: uids.append(doc["uid"]) if name == "start" else None)
    with open_catalog(tmp_path / "cat") as cat:
        cat.subscribe(nvRE, tmp_path / "spool")
        started = time.monotonic()
        with pytest.raises(NvmriError, match="lost the connection to .*IOC stopped"):
            nvRE(_frequency_scan(devices, 20, _kill_at(6, handle.process.kill)))
        assert time.monotonic() - started < 60
        cat.flush()
    stop = _stop_reason(tmp_path / "cat", uids[0])
    assert stop["exit_status"] == "fail"
    assert "lost the connection to" in stop["reason"] and handle.prefix in stop["reason"]
    assert "Status(" not in stop["reason"]


def test_a_put_or_trigger_after_the_ioc_is_gone_says_the_connection_was_lost(
        make_ioc: Any, nvRE: Any) -> None:
    """The other order of the race above: the disconnect is seen before the put starts."""
    handle, devices = make_ioc("paper-fig2")
    f0 = devices.mw.frequency.get()
    handle.process.kill()
    handle.process.wait(10)
    deadline = time.monotonic() + 30
    while devices.mw.frequency.connected or devices.counter.acquire.connected:
        assert time.monotonic() < deadline, "pyepics did not see the IOC go"
        time.sleep(0.05)
    with pytest.raises(NvmriError, match=r"lost the connection to \S+MW:FREQ_RBV during the "
                                         r"put to \S+MW:FREQ .*IOC stopped"):
        nvRE(bps.mv(devices.mw.frequency, f0 + 1e6))
    with pytest.raises(NvmriError, match="lost the connection to .*counter.*IOC stopped"):
        devices.counter.trigger()


def test_the_stop_reason_of_a_ctrl_c_reaches_the_catalog(devices: Any, nvRE: Any,
                                                         tmp_path: Path) -> None:
    from nvmri_bluesky.catalog import open_catalog

    uids: list[str] = []
    nvRE.subscribe(lambda name, doc: uids.append(doc["uid"]) if name == "start" else None)
    with open_catalog(tmp_path / "cat") as cat:
        cat.subscribe(nvRE, tmp_path / "spool")
        ctrl_c = _kill_at(4, lambda: os.kill(os.getpid(), signal.SIGINT))   # a real SIGINT
        with pytest.raises(RunEngineInterrupted):
            nvRE(_frequency_scan(devices, 12, ctrl_c))
        nvRE.abort("interrupted (Ctrl-C)")
        cat.flush()
    stop = _stop_reason(tmp_path / "cat", uids[0])
    assert (stop["exit_status"], stop["reason"]) == ("abort", "interrupted (Ctrl-C)")


def test_a_refused_plan_raises_one_readable_line(devices: Any, nvRE: Any) -> None:
    with pytest.raises(NvmriError) as err:
        nvRE(bps.mv(devices.stage.z.high_limit_travel, 5.0))    # = LLM: refused
    assert "\n" not in str(err.value) and "the IOC refused 5.0 nm" in str(err.value)


# ---------------------------------------------------------------- suspenders


def test_a_laser_fault_mid_raster_suspends_and_every_point_is_valid(make_ioc: Any,
                                                                     nvRE: Any) -> None:
    from nvmri_bluesky.callbacks import Progress
    from nvmri_bluesky.plans import esr_raster
    from nvmri_bluesky.run_engine import install_suspenders

    fault = {"kind": "laser_off", "after_acquisitions": 8, "seconds": 2.0}
    from nvmri_bluesky.sim.scenario import load_scenario

    scenario = dataclasses.replace(load_scenario("paper-fig2"), name="laser-fault")
    handle, devices = make_ioc({**scenario.to_dict(), "faults": [fault]})
    line = io.StringIO()
    progress = Progress(stream=line, interval_s=0.0, inline=False)
    nvRE.subscribe(progress)
    install_suspenders(nvRE, devices.health, sleep_s=0.5, notify=progress.note)
    events: list[dict] = []
    nvRE.subscribe(lambda name, doc: events.append(doc) if name == "event" else None)
    f_mw = devices.mw.frequency.get()
    result = nvRE(esr_raster(devices, x=(-20, 20, 4), y=(-20, 20, 4), z=60.0,
                             mw_frequency_hz=f_mw, shots=2000))
    assert result
    counts = np.array([ev["data"]["counter_counts"] for ev in events])
    assert counts.shape == (16, 2)
    assert (counts > 0).all(), counts          # no point of the fault was kept
    assert "suspended: laser fault" in line.getvalue()
    acq_ids = [ev["data"]["counter_acq_id"] for ev in events]
    assert acq_ids[-1] - acq_ids[0] > 15       # the faulty acquisition(s) were repeated


# ---------------------------------------------------------------- SIGTERM


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _demo_under_way(*args: str) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """``nvmri demo --quick ARGS`` in a new session, returned once a run is under way."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "nvmri"), "demo", "--quick", *args]
    demo = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(demo.stderr.readline, "")),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("points" in line for line in err):          # a run is under way
        assert demo.poll() is None, "".join(err)
        assert time.monotonic() < deadline, "".join(err)
        time.sleep(0.2)
    return demo, err, reader


def _gone(family: set[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in family if _alive(p)]


def test_sigkill_to_nvmri_demo_leaves_no_process_behind(tmp_path: Path) -> None:
    """Killed outright (no handler runs), the demo's workers and IOCs still end."""
    demo, err, _ = _demo_under_way("--jobs", "2", "--out", str(tmp_path / "out"))
    family = _descendants(demo.pid)
    assert len(family) >= 4, family          # two workers and their IOCs at least
    demo.kill()
    demo.wait(30)
    left = _gone(family, 60)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "".join(err)


def test_end_with_delivers_sigterm_when_the_watched_process_ends() -> None:
    """A fork server's worker watches the main process, not its parent (the fork server)."""
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    code = ("import signal, sys, time\n"
            "from nvmri_bluesky.interrupts import end_with\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
            f"end_with({watched.pid})\n"
            "time.sleep(60)\n"
            "sys.exit(0)\n")
    worker = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert worker.wait(30) == 7          # SIGTERM came within 30 s, not after the 60 s sleep
    finally:
        worker.kill()
        watched.wait(10)


def test_sigterm_to_nvmri_demo_leaves_no_process_behind(tmp_path: Path) -> None:
    demo, err, reader = _demo_under_way("--scenario", "paper-fig2", "--jobs", "1", "--out",
                                        str(tmp_path / "out"))
    family = _descendants(demo.pid)
    assert family, "the demo should have started its simulated IOC"
    demo.send_signal(signal.SIGTERM)
    try:
        rc = demo.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGKILL)
        raise
    reader.join(10)
    assert not _gone(family, 30), "".join(err)
    assert rc == 130, "".join(err)
    assert "terminated (SIGTERM)" in "".join(err)


def test_an_ioc_that_stops_answering_is_reported_while_the_run_waits(
        make_ioc: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    scenario = {"name": "pause", "dark_spins": {"points": [], "layers": []},
                "faults": [{"kind": "ioc_pause", "after_acquisitions": 1, "seconds": 7.0}]}
    _, devices = make_ioc(scenario)
    devices.pulser.load(pulses.cw_odmr())
    devices.counter.trigger().wait(30)
    caplog.set_level(logging.WARNING, logger="nvmri_bluesky.devices.counter")
    status = devices.counter.trigger()                 # stalls for 7 s
    deadline = time.monotonic() + 6.8
    while not caplog.records and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not status.done                             # reported while still waiting
    assert "has not completed after 5 s" in caplog.records[0].getMessage()
    status.wait(60)                                    # and the acquisition then completes
    assert len(caplog.records) == 1


def test_a_refused_plan_prints_one_line_in_ipython(devices: Any, capsys: Any) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    from nvmri_bluesky.profile import short_errors

    shell = InteractiveShell.instance()
    try:
        assert short_errors(shell)
        shell.user_ns["devices"] = devices
        shell.run_cell("from nvmri_bluesky.run_engine import RunEngine\n"
                       "import bluesky.plan_stubs as bps\n"
                       "RE = RunEngine({})\n"
                       "RE(bps.mv(devices.stage.z.high_limit_travel, 5.0))")
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [line for line in err if "NvmriError" in line], err
        assert len(err) == 1 and "the IOC refused 5.0 nm" in err[0] and "%tb" in err[0]
    finally:
        InteractiveShell.clear_instance()


def test_remembered_protocol_attributes_give_the_same_answers() -> None:
    """The RunEngine's protocol-attribute cache (Python 3.11) changes no isinstance answer."""
    import typing

    from bluesky.protocols import Movable, Readable, Triggerable, WritesExternalAssets
    from ophyd.sim import det, motor

    from nvmri_bluesky.run_engine import remember_protocol_attributes

    cases = [(obj, proto) for obj in (det, motor, object(), 1.0)
             for proto in (Readable, Movable, Triggerable, WritesExternalAssets)]
    collect = getattr(typing._get_protocol_attrs, "__wrapped__", typing._get_protocol_attrs)
    before = [isinstance(obj, proto) for obj, proto in cases]
    remembered = remember_protocol_attributes()
    assert remembered == (sys.version_info < (3, 12))
    assert [isinstance(obj, proto) for obj, proto in cases] == before
    assert before[:4] == [True, False, True, False] and before[4:6] == [True, True]
    if remembered:
        assert typing._get_protocol_attrs(Readable) == frozenset(collect(Readable))
        assert typing._get_protocol_attrs(Readable) is typing._get_protocol_attrs(Readable)


def test_span_attributes_are_filled_only_for_a_recording_span() -> None:
    """Without a tracer the RunEngine skips the per-message span attributes; a span that
    records them still gets them."""
    import bluesky.run_engine as bre
    from bluesky.utils import Msg

    from nvmri_bluesky.run_engine import skip_unrecorded_span_attributes

    assert skip_unrecorded_span_attributes() and skip_unrecorded_span_attributes()

    class Span:
        def __init__(self, recording: bool) -> None:
            self.recording, self.attributes = recording, {}

        def is_recording(self) -> bool:
            return self.recording

        def set_attribute(self, key: str, value: Any) -> None:
            self.attributes[key] = value

    msg = Msg("set", None, 1.0, group="g")
    quiet, recording = Span(False), Span(True)
    bre._set_span_msg_attributes(quiet, msg)
    bre._set_span_msg_attributes(recording, msg)
    assert quiet.attributes == {}
    assert recording.attributes["msg.command"] == "set" and "msg.kwargs" in recording.attributes
