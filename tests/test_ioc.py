"""The simulated IOC in a subprocess, driven through caproto's own client."""

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest

from nvmri_bluesky import pulses as P
from nvmri_bluesky.sim import ioc as sim_ioc

PREFIX = "TIOC:"


def _free_port():
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def ca():
    """(caproto client context, IOC process) for an IOC serving paper-fig4 on a private port."""
    from caproto.threading.client import Context

    port = _free_port()
    env = {"EPICS_CA_ADDR_LIST": "127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST": "NO",
           "EPICS_CA_SERVER_PORT": str(port), "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
           "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO", "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvmri_bluesky.sim.ioc", "--prefix", PREFIX, "--port", str(port),
         "--scenario", "paper-fig4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=30)
        assert line.startswith(f"NVMRI IOC ready prefix={PREFIX}"), line
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            ctx = Context()
            yield ctx, proc
            ctx.disconnect()
    finally:
        proc.terminate()
        proc.wait(10)


def pv(ctx, name):
    (chan,) = ctx.get_pvs(PREFIX + name, timeout=5)
    chan.wait_for_connection(timeout=5)
    return chan


def value(ctx, name):
    data = pv(ctx, name).read(timeout=5).data
    return data[0] if len(data) == 1 else data


def text(ctx, name):
    data = pv(ctx, name).read(timeout=5).data
    raw = data[0] if len(data) and isinstance(data[0], bytes) else bytes(data)
    return raw.rstrip(b"\0").decode()


def refused_put(ctx, name, data):
    """Put without waiting (caproto's client ignores a put's error reply); let it settle."""
    pv(ctx, name).write(data, wait=False)
    time.sleep(0.2)


def test_pv_list_matches_the_contract():
    names = sim_ioc.pv_names("NVMRI:")
    expected = ["STAGE:X", "STAGE:Y", "STAGE:Z", "PG:PROGRAM", "PG:STATUS", "PG:MESSAGE",
                "PG:CHECKSUM", "PG:GATES", "PG:SHOTS", "PG:ACQUIRE", "CNT:COUNTS", "CNT:ACQ_ID",
                "HEALTH:LASER_OK", "HEALTH:STAGE_OK"]
    expected += [f"{src}:{k}{rbv}" for src in ("MW", "RF") for k in ("FREQ", "POWER", "OUTPUT")
                 for rbv in ("", "_RBV")]
    assert sorted(names) == sorted("NVMRI:" + n for n in expected)


def test_motor_move_pulses_dmov(ca):
    ctx, _ = ca
    dmov = []
    sub = pv(ctx, "STAGE:X.DMOV").subscribe()

    def on_dmov(sub, response):             # caproto keeps only a weak reference
        dmov.append(int(response.data[0]))

    sub.add_callback(on_dmov)
    time.sleep(0.3)
    dmov.clear()
    for target in (12.5, 12.5):                    # the second is a zero-length move
        pv(ctx, "STAGE:X").write([target], wait=True, timeout=5)
    deadline = time.monotonic() + 5
    while len(dmov) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dmov == [0, 1, 0, 1]
    assert value(ctx, "STAGE:X.RBV") == 12.5
    assert text(ctx, "STAGE:X.EGU") == "nm"
    sub.clear()


def test_crash_guard(ca):
    from caproto import ChannelType

    ctx, _ = ca
    z = pv(ctx, "STAGE:Z")
    limits = z.read(data_type=ChannelType.CTRL_DOUBLE, timeout=5).metadata
    assert limits.lower_ctrl_limit == 5.0
    before = value(ctx, "STAGE:Z.RBV")
    refused_put(ctx, "STAGE:Z", [4.0])
    refused_put(ctx, "STAGE:Z.LLM", [1.0])
    assert value(ctx, "STAGE:Z.RBV") == before
    assert value(ctx, "STAGE:Z.LLM") == 5.0
    pv(ctx, "STAGE:Z.LLM").write([8.0], wait=True, timeout=5)         # narrowing is fine
    limits = z.read(data_type=ChannelType.CTRL_DOUBLE, timeout=5).metadata
    assert limits.lower_ctrl_limit == 8.0
    pv(ctx, "STAGE:Z.LLM").write([5.0], wait=True, timeout=5)


def test_sources_have_readbacks(ca):
    ctx, _ = ca
    pv(ctx, "MW:FREQ").write([6.3e9], wait=True, timeout=5)
    pv(ctx, "RF:OUTPUT").write([1], wait=True, timeout=5)
    assert value(ctx, "MW:FREQ_RBV") == 6.3e9
    assert value(ctx, "RF:OUTPUT_RBV") == 1


def test_program_and_acquire(ca):
    ctx, _ = ca
    program = pv(ctx, "PG:PROGRAM")
    refused_put(ctx, "PG:PROGRAM", b'{"name": "x", "gates": [{"name": "g", "pulses": []}]}')
    assert "needs exactly one counter window" in text(ctx, "PG:MESSAGE")
    assert value(ctx, "PG:STATUS") == 2                                 # Error

    deer = P.deer(8e-6, lock_detunings=(-4e6, 4e6, 1e8))
    program.write(deer.to_json().encode(), wait=True, timeout=5)
    assert text(ctx, "PG:MESSAGE") == "OK"
    assert value(ctx, "PG:STATUS") == 0
    assert json.loads(text(ctx, "PG:GATES")) == deer.gate_names
    pv(ctx, "PG:SHOTS").write([2000], wait=True, timeout=5)

    acquire = pv(ctx, "PG:ACQUIRE")
    first = value(ctx, "CNT:ACQ_ID")
    for _ in range(5):
        acquire.write([1], wait=True, timeout=5)
    assert value(ctx, "CNT:ACQ_ID") == first + 5
    counts = pv(ctx, "CNT:COUNTS").read(timeout=5).data
    assert len(counts) == len(deer.gate_names)
    assert counts.sum() > 0


PYEPICS_CLIENT = """
import json, sys, time
import epics
prefix, program = sys.argv[1], sys.argv[2]
epics.caput(prefix + "PG:PROGRAM", program, wait=True)
ids = []
mon = epics.PV(prefix + "CNT:ACQ_ID", callback=lambda value=None, **k: ids.append(value))
acquire = epics.PV(prefix + "PG:ACQUIRE")
acquire.wait_for_connection(5)
mon.wait_for_connection(5)
time.sleep(0.3)
stale, n = 0, 100
t0 = time.perf_counter()
for _ in range(n):
    before = ids[-1]
    acquire.put(1, wait=True, timeout=5)
    stale += ids[-1] != before + 1
print(json.dumps({"stale": stale, "ms": (time.perf_counter() - t0) / n * 1e3}))
"""


def test_counts_are_posted_before_the_put_completes(ca):
    """Through pyepics (ophyd's client): the ACQ_ID monitor is fresh in the put callback."""
    out = subprocess.run(                   # a fresh process: libca reads the EPICS_* env
        [sys.executable, "-c", PYEPICS_CLIENT, PREFIX, P.frequency_lock((0.0,)).to_json()],
        capture_output=True, text=True, timeout=60, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stale"] == 0
    assert result["ms"] < 50
    print("pyepics acquire put->completion", result)


def test_main_lists_pvs(capsys):
    assert sim_ioc.main(["--list-pvs", "--prefix", "A:"]) == 0
    assert "A:PG:ACQUIRE" in capsys.readouterr().out.split()
    assert sim_ioc.main(["--scenario", "nope"]) == 2
    assert "unknown scenario 'nope'" in capsys.readouterr().err
