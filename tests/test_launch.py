"""sim.launch (private-port IOC subprocesses) and the bench harness."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from nvmri_bluesky import bench
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.sim import launch


def test_ca_environment_is_private_loopback() -> None:
    ports = launch.client_ports()
    assert ports and os.environ["EPICS_CA_AUTO_ADDR_LIST"] == "NO"
    assert os.environ["EPICS_CA_SERVER_PORT"] == str(ports[0])
    assert os.environ["EPICS_CA_ADDR_LIST"].split() == (
        ["127.0.0.1"] + [f"127.0.0.1:{p}" for p in ports[1:]])
    env = launch.ioc_env(ports[0], base={})
    assert env["EPICS_CA_SERVER_PORT"] == env["EPICS_CAS_SERVER_PORT"] == str(ports[0])
    assert env["EPICS_CAS_INTF_ADDR_LIST"] == "127.0.0.1"
    assert env["EPICS_CAS_AUTO_BEACON_ADDR_LIST"] == "NO"


def test_the_demos_fork_server_preloads_no_channel_access() -> None:
    """The demo's workers configure Channel Access themselves: what their fork server
    imports beforehand must not bring in a CA client (pyepics, ophyd)."""
    import subprocess
    import sys

    code = ("import importlib, sys\n"
            "from nvmri_bluesky.demo import WORKER_PRELOAD\n"
            "for name in WORKER_PRELOAD: importlib.import_module(name)\n"
            "print(sorted(m for m in ('epics', 'ophyd') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_reconfiguring_after_ca_started_is_refused(devices: Any) -> None:
    assert launch.ca_initialised()
    with pytest.raises(NvmriError, match="before `import ophyd`"):
        launch.configure_ca_env([1])
    launch.configure_ca_env(launch.client_ports())      # the same settings: harmless


def test_parallel_iocs_do_not_see_each_other(ioc: Any, devices: Any, make_ioc: Any) -> None:
    other, other_devices = make_ioc({"name": "elsewhere", "stage": {"start_nm": [7, 8, 90]},
                                     "dark_spins": {"points": [], "layers": []}})
    assert other.port != ioc.port and other.prefix != ioc.prefix
    assert other_devices.stage.position == (7.0, 8.0, 90.0)
    assert launch.search_pv(other.pv("PG:STATUS"), other.port)
    assert not launch.search_pv(other.pv("PG:STATUS"), ioc.port)
    assert not launch.search_pv(ioc.pv("PG:STATUS"), other.port)
    assert devices.stage.position != other_devices.stage.position


def test_ioc_for_another_process_leaves_this_client_alone(devices: Any) -> None:
    before = dict(os.environ), launch.client_ports()
    with launch.start_ioc("paper-fig2", configure_client=False) as handle:
        assert handle.port not in launch.client_ports()
        assert launch.search_pv(handle.pv("PG:STATUS"), handle.port)
        env = launch.ioc_env(handle.port, base={})
        assert env["EPICS_CA_SERVER_PORT"] == str(handle.port)
    assert (dict(os.environ), launch.client_ports()) == before


def test_invalid_scenario_fails_before_spawning() -> None:
    t0 = time.monotonic()
    with pytest.raises(NvmriError, match="bogus"):
        launch.start_ioc({"bogus": 1})
    assert time.monotonic() - t0 < 2.0


def test_ioc_that_dies_at_startup_reports_its_output() -> None:
    with pytest.raises(NvmriError) as err:
        launch.start_ioc("paper-fig2", time_scale=-1.0, timeout=20.0)
    message = str(err.value)
    assert "exited with code" in message and "time-scale" in message
    assert "\n" not in message


def test_stop_is_clean_and_idempotent(make_ioc: Any) -> None:
    handle, _ = make_ioc("paper-fig2", connect=False)
    assert handle.alive and launch.search_pv(handle.pv("PG:STATUS"), handle.port)
    workdir = handle.workdir
    handle.stop()
    assert not handle.alive and not workdir.exists()
    assert handle.stop() == handle.process.returncode
    assert not launch.search_pv(handle.pv("PG:STATUS"), handle.port)



def test_ioc_stops_on_sigint_even_if_its_launcher_ignores_sigint(make_ioc: Any) -> None:
    """A launcher started in the background without job control (``cmd &`` in a script,
    nohup, some CI runners) has SIGINT ignored, and its children inherit that: the IOC
    must still stop on the SIGINT of ``stop()`` (exit code 0), not on the SIGTERM after it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        handle, _ = make_ioc("paper-fig2", connect=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    ignored = int(next(line for line in open(f"/proc/{handle.process.pid}/status")
                       if line.startswith("SigIgn:")).split()[1], 16)
    assert not ignored & (1 << (signal.SIGINT - 1))
    assert handle.stop() == 0

# ---------------------------------------------------------------- bench harness


def _fake_benchmarks(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "bench_fast_one.py").write_text(
        "def run():\n"
        "    return {'name': 'fast-one', 'ours': 2.0, 'baseline': 1.0, 'ratio': 2.0,\n"
        "            'unit': 'ms', 'detail': {'n': 3, 'nan': float('nan')}}\n")
    (tmp_path / "bench_two.py").write_text(
        "def run():\n"
        "    row = {'name': 'two', 'ours': 1, 'baseline': 1, 'ratio': 1, 'unit': 's',\n"
        "           'detail': 'x'}\n"
        "    return [row, dict(row, name='two-b')]\n")
    (tmp_path / "bench_broken.py").write_text("def run():\n    raise RuntimeError('boom')\n")
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)


def test_bench_discovers_modules_with_dashed_names(tmp_path: Path, monkeypatch: Any) -> None:
    _fake_benchmarks(tmp_path, monkeypatch)
    assert list(bench.discover()) == ["broken", "fast-one", "two"]
    with pytest.raises(NvmriError, match="unknown benchmark.*nope"):
        bench.run(["nope"], as_json=True)


def test_bench_json_lines_and_table(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    _fake_benchmarks(tmp_path, monkeypatch)
    assert bench.run(["fast-one", "two"], as_json=True) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["name"] for r in rows] == ["fast-one", "two", "two-b"]
    assert all(set(r) == set(bench.KEYS) for r in rows)
    assert rows[0]["detail"]["nan"] is None
    assert bench.run(["fast_one"], as_json=False) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:6] == ["name", "ours", "baseline", "ratio", "unit",
                                               "detail"]
    assert bench.run(None, as_json=True) == 1                 # broken fails, others still run
    captured = capsys.readouterr()
    assert "broken failed: boom" in captured.err
    assert len(captured.out.splitlines()) == 3


def test_real_benchmarks_directory_has_ca_scan() -> None:
    assert "ca-scan" in bench.discover()
