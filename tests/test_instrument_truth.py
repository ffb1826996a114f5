"""Issue 13: every put is applied or refused loudly, and the IOC survives any put.

Real parts only: the simulated IOC subprocess, spoken to over Channel Access by
ophyd, pyepics (``epics.caput`` / ``epics.Motor``) and caproto's CLI.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
import pytest

from nvmri_bluesky import pulses
from nvmri_bluesky.devices import LimitExceeded
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans.service import set_z_min
from nvmri_bluesky.sim import launch

CW = pulses.cw_odmr((0.0,))




def _program(**changes: Any) -> str:
    """The CW program's JSON with its first gate changed (``name``) or its laser pulse's."""
    data = json.loads(CW.to_json())
    gate = data["gates"][0]
    if "gate_name" in changes:
        gate["name"] = changes["gate_name"]
    if "laser_s" in changes:
        gate["pulses"][0]["duration"] = changes["laser_s"]
    return json.dumps(data)


def _good_acquisition(devices: Any) -> np.ndarray:
    """Load the CW program, 100 shots, acquire once; the counts (fails the test if not fresh)."""
    devices.pulser.load(CW)
    devices.pulser.shots.set(100).wait(30)
    before = devices.counter.acq_id.get()
    devices.counter.trigger().wait(30)
    assert devices.counter.acq_id.get() == before + 1
    counts = devices.counter.counts.get()
    assert counts.shape == (1,) and np.isfinite(counts).all() and counts[0] > 0
    return counts


# ---------------------------------------------------------------- refused puts fail loudly


@pytest.mark.parametrize("bad", [0, -1, 2**31, 2**40])
def test_shots_outside_the_range_fail_before_the_put(devices: Any, bad: int) -> None:
    devices.pulser.shots.set(1234).wait(30)
    with pytest.raises(LimitExceeded, match=r"outside 1..1e\+09 shots; not set"):
        devices.pulser.shots.set(bad)
    assert devices.pulser.shots.get(use_monitor=False) == 1234


def test_shots_the_ioc_refuses_fail_the_status_with_its_reason(devices: Any) -> None:
    """10**7 shots are in range, but 10**7 * 0.1 s acquires for 10**6 s: the IOC says no."""
    long_gate = json.loads(_program(laser_s=0.1))
    long_gate["gates"][0]["pulses"][1]["duration"] = 0.1
    long_gate["gates"][0]["pulses"][2]["duration"] = 0.1
    devices.pulser.load(long_gate)
    devices.pulser.shots.set(100).wait(30)
    status = devices.pulser.shots.set(10_000_000)
    with pytest.raises(NvmriError, match="shots refused: .* at most 86400 s"):
        status.wait(30)
    assert devices.pulser.shots.get(use_monitor=False) == 100
    _good_acquisition(devices)


def test_the_run_records_the_shots_the_instrument_used(devices: Any, RE: Any,
                                                       collect: Any) -> None:
    import bluesky.plans as bp

    devices.pulser.load(CW)

    def plan():
        yield from bps.mv(devices.pulser.shots, 321)
        yield from bp.count([devices.counter], num=1)

    docs = collect(plan())
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    assert descriptor["configuration"]["counter"]["data"]["counter_shots"] == 321
    with pytest.raises(LimitExceeded):
        RE(bps.mv(devices.pulser.shots, 2**31))
    assert devices.counter.shots.get(use_monitor=False) == 321


@pytest.mark.parametrize("gate_name", [["a", "b"], {"a": 1}, 7])
def test_a_program_that_breaks_the_ioc_is_refused_with_its_reason(devices: Any,
                                                                   gate_name: Any) -> None:
    devices.pulser.load(pulses.cw_odmr((0.0, 1e6)))
    with pytest.raises(NvmriError, match="pulser refused program 'cw_odmr'"):
        devices.pulser.load(_program(gate_name=gate_name))
    message = devices.pulser.message.get(use_monitor=False)
    assert message.startswith("program refused:") and message != "OK"
    assert devices.pulser.gate_names() == ["cw_0", "cw_1"]          # the old one is kept
    _good_acquisition(devices)


def test_an_empty_program_is_not_reported_loaded(devices: Any) -> None:
    devices.pulser.load(CW)
    with pytest.raises(NvmriError, match="pulser refused program"):
        devices.pulser.load("")
    _good_acquisition(devices)


def test_a_program_longer_than_the_pv_is_refused_before_sending(devices: Any) -> None:
    data = json.loads(CW.to_json())
    data["name"] = "x" * 250_000
    with pytest.raises(NvmriError, match="holds fewer than"):
        devices.pulser.set(data)


def test_set_z_min_outside_the_travel_is_refused_before_any_put(devices: Any, RE: Any,
                                                                ioc: Any) -> None:
    z_floor = ioc.scenario.z_min_nm
    low_before = devices.stage.z.low_limit_travel.get()
    started = time.monotonic()
    with pytest.raises(NvmriError, match="outside the range"):
        RE(set_z_min(devices, z_floor / 2))
    assert time.monotonic() - started < 10
    assert devices.stage.z.low_limit_travel.get(use_monitor=False) == low_before
    # nothing left pending: the next set_z_min works, and so does a move
    RE(set_z_min(devices, z_floor + 1.0))
    assert devices.stage.z.low_limit_travel.get(use_monitor=False) == z_floor + 1.0
    RE(set_z_min(devices, z_floor))


def test_a_limit_put_the_ioc_refuses_fails_and_leaves_no_alarm(devices: Any, nvRE: Any) -> None:
    z = devices.stage.z
    high = z.high_limit_travel.get()
    z.high_limit_travel.set(500.0).wait(30)
    try:
        with pytest.raises(NvmriError, match="the IOC refused 600.0 nm"):
            z.low_limit_travel.set(600.0).wait(30)      # above HLM: the IOC refuses
        with pytest.raises(NvmriError, match="the IOC refused"):
            nvRE(set_z_min(devices, 600.0))             # the same inside a plan
        assert z.user_readback.alarm_severity == 0
        nvRE(bps.mv(z, 150.0))                            # the next move is fine
        assert z.position == pytest.approx(150.0)
    finally:
        z.high_limit_travel.set(high).wait(30)


# ---------------------------------------------------------------- the IOC survives any put


def _fuzz(prefix: str) -> list[tuple[str, Any]]:
    """Bad puts (PV, value), each refused by the IOC; kept as the issue asks."""
    return [
        ("PG:SHOTS", 0), ("PG:SHOTS", -1), ("PG:SHOTS", 2**31 - 1),
        ("PG:PROGRAM", _program(gate_name=["a"])), ("PG:PROGRAM", _program(gate_name={})),
        ("PG:PROGRAM", ""), ("PG:PROGRAM", "{"), ("PG:PROGRAM", "[1, 2]"),
        ("PG:PROGRAM", _program(laser_s=1e300)), ("PG:PROGRAM", _program(laser_s=-1.0)),
        ("PG:PROGRAM", _program(laser_s=math.nan)),
        ("MW:FREQ", math.nan), ("MW:FREQ", 1e300), ("MW:FREQ", -5.0), ("RF:FREQ", math.inf),
        ("MW:POWER", math.nan), ("MW:POWER", 1e6), ("MW:OUTPUT", 7),
        ("STAGE:X.VELO", 0.0), ("STAGE:X.VELO", -100.0), ("STAGE:X.VELO", 1e-320),
        ("STAGE:X.VELO", math.nan), ("STAGE:Z.JVEL", math.inf),
        ("STAGE:Z.LLM", -1e308), ("STAGE:Z.LLM", math.nan), ("STAGE:Z.HLM", 1e308),
        ("STAGE:Z.DLLM", -5.0), ("STAGE:X.VAL", 1e308), ("STAGE:X.VAL", math.nan),
        ("STAGE:Z.VAL", -1000.0), ("STAGE:X.HOMF", 1), ("STAGE:X.HOMR", 1),
        ("STAGE:X.RLV", 1e300), ("STAGE:X.SET", 1), ("PG:ACQUIRE", 1),
    ]


def test_the_ioc_serves_a_good_acquisition_after_each_bad_put(make_ioc: Any) -> None:
    import epics

    handle, devices = make_ioc("paper-fig2")
    _good_acquisition(devices)
    velocity = epics.caget(handle.pv("STAGE:X.VELO"))
    for suffix, value in _fuzz(handle.prefix):
        if suffix == "PG:ACQUIRE":                           # an acquisition of nothing
            epics.caput(handle.pv("PG:PROGRAM"), _program(laser_s=1e300), wait=True)
        epics.caput(handle.pv(suffix), value, wait=True, timeout=30)
        counts = _good_acquisition(devices)
        assert counts[0] > 0, (suffix, value)
        assert epics.caget(handle.pv("STAGE:X.VELO")) == velocity, (suffix, value)
        assert handle.alive, (suffix, value, handle.log_tail())
    position = devices.stage.x.position
    devices.stage.x.move(position + 1.0, wait=True)
    assert devices.stage.x.position == pytest.approx(position + 1.0)
    assert "Traceback" not in handle.log_tail(200)


def test_shots_refused_over_ca_say_why_in_pg_message(make_ioc: Any) -> None:
    """caproto's CLI: a bad PG:SHOTS put leaves the value and says why in PG:MESSAGE."""
    handle, _ = make_ioc("paper-fig2", connect=False)
    env = {**os.environ, **launch.ioc_env(handle.port)}
    env["EPICS_CA_ADDR_LIST"] = f"127.0.0.1:{handle.port}"
    env["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
    bindir = os.path.dirname(sys.executable)
    put = subprocess.run([os.path.join(bindir, "caproto-put"), handle.pv("PG:SHOTS"), "0"],
                         env=env, capture_output=True, text=True, timeout=120)
    got = subprocess.run([os.path.join(bindir, "caproto-get"), handle.pv("PG:SHOTS"),
                          handle.pv("PG:MESSAGE")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert put.returncode != 0 or "error" in (put.stdout + put.stderr).lower()
    shots, message = (line.split(None, 1)[1] for line in got.stdout.splitlines())
    assert shots == "[1000]", got.stdout
    text = bytes(int(c) for c in message.strip("[]").split()).decode()   # a char waveform
    assert text == "shots refused: shots must be an integer in 1..1000000000, got 0"


def test_an_exception_in_an_acquisition_is_reported_and_the_next_one_works() -> None:
    """In-process unit test of the IOC's acquisition putter (no CA)."""
    import asyncio

    from nvmri_bluesky.sim.ioc import make_ioc as build

    ioc = build("paper-fig2")

    async def run() -> None:
        await ioc.program.write(CW.to_json())
        original = ioc.engine.acquire

        def broken():
            raise np.linalg.LinAlgError("Eigenvalues did not converge")

        ioc.engine.acquire = broken
        with pytest.raises(NvmriError, match="LinAlgError: Eigenvalues did not converge"):
            await ioc.acquire.write(1)
        assert ioc.status.value == "Error"
        assert "acquisition failed: LinAlgError" in ioc.message.value
        ioc.engine.acquire = original
        await ioc.acquire.write(1)
        assert ioc.status.value == "Idle" and ioc.message.value == "OK"
        assert ioc.acq_id.value == 1

    asyncio.run(run())


def test_a_taken_port_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "nvmri_bluesky.sim.ioc", "--port",
                                 str(port)], capture_output=True, text=True, timeout=120,
                                env=launch.ioc_env(port))
    assert result.returncode == 2
    assert f"--port {port} is taken" in result.stderr
    assert "ready" not in result.stdout


# ---------------------------------------------------------------- scenario files

BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]\n"
    for p, k in zip("abcdefgh", "bcdefghi", strict=True))
"""A 9**9-value YAML alias bomb in ~350 bytes."""


def test_a_yaml_bomb_is_refused_within_a_second(tmp_path: Any) -> None:
    from nvmri_bluesky.sim.scenario import load_scenario

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 400
    started = time.monotonic()
    with pytest.raises(NvmriError, match=r"bomb.yaml: more than 100000 values"):
        load_scenario(path)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(("text", "why"), [
    ("b0_tesla: 1.0e+308\n", r"b0_tesla: must be <= 5, got 1e\+308"),
    ("b0_tesla: 1e308\n", r"b0_tesla: expected a number, got a string '1e308'"),
    ("tip: {moment_am2: 1.0e+30}\n", r"tip.moment_am2: must be <= 1e-10"),
    ("name: " + "x" * 5000 + "\nseed: [" + "1, " * 5000 + "1]\n",
     r"seed: expected a number, got a list \[1, 1, .{40,60}\(15003 characters\)$"),
    ("dark_spins: {layers: [{z_nm: -2, density_per_nm2: 1.0e+6, radius_nm: 1000}]}\n",
     r"dark_spins: 3.14e\+12 spins; the simulator takes at most 100000"),
    ("[" * 100_000 + "\n", r"nested too deeply|not valid YAML"),
])
def test_scenario_refusals_name_file_key_and_why(tmp_path: Any, text: str, why: str) -> None:
    from nvmri_bluesky.sim.scenario import load_scenario

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(NvmriError) as err:
        load_scenario(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400
    assert __import__("re").search(why, message), message


def test_a_scenario_file_not_utf8_or_too_big_is_refused(tmp_path: Any) -> None:
    from nvmri_bluesky.sim.scenario import load_scenario

    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00name: x")
    with pytest.raises(NvmriError, match=r"binary.yaml: not UTF-8 text"):
        load_scenario(path)
    path = tmp_path / "huge.json"
    path.write_text(" " * 1_000_001 + "{}")
    with pytest.raises(NvmriError, match=r"huge.json: 1000003 bytes; a scenario file has at"):
        load_scenario(path)
