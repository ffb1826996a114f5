"""A shared deployment on loopback: IOC, PostgreSQL catalog, 0MQ proxy, queue server, live view.

Brought up once for the module, in the order of ``docs/deployment.md``: the
simulated IOC, the facility tiled server on fresh PostgreSQL databases with a
write and a read API key, a 0MQ proxy, and bluesky-queueserver's RE Manager
with ``profile_collection/startup`` on the machine's Redis under a name
prefix of its own.  Needs Redis at 127.0.0.1:6379 and PostgreSQL at
127.0.0.1:5432; in CI (``CI`` set) their absence is a failure, not a skip.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from services import REPO, require_service

from nvmri_bluesky import testing

pytestmark = [pytest.mark.facility, pytest.mark.timeout(900)]

DEER_RF_HZ = 3.4e9
"""RF carrier of the test rasters (any value inside the RF source's range)."""


# ----------------------------------------------------------------------------- the deployment

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("facility")


@pytest.fixture(scope="module")
def catalog_server(workdir: Path) -> Iterator[testing.CatalogServer]:
    """The facility tiled server, started early (it takes a while) and waited for on use."""
    require_service(testing.postgres_available(), f"PostgreSQL at {testing.POSTGRES_URI}")
    server = testing.start_catalog_server(wait=False, log_dir=workdir / "logs",
                                          data_dir=workdir / "tiled-data")
    yield server
    server.stop(drop=True)


@pytest.fixture(scope="module", autouse=True)
def _boot_catalog_early(catalog_server: testing.CatalogServer) -> None:
    """Start the catalog server before the first test so it boots while others run."""


@pytest.fixture(scope="module")
def catalog(catalog_server: testing.CatalogServer) -> SimpleNamespace:
    """``uri``, ``write_key``, ``read_key`` and ``open()`` (a reading ``Catalog``)."""
    from nvmri_bluesky.catalog import READ_SCOPES, WRITE_SCOPES, open_catalog

    catalog_server.wait_ready(240)
    write_key = catalog_server.create_api_key(WRITE_SCOPES, note="instrument")
    read_key = catalog_server.create_api_key(READ_SCOPES, note="analysis")
    return SimpleNamespace(uri=catalog_server.uri, write_key=write_key, read_key=read_key,
                           open=lambda: open_catalog(catalog_server.uri, api_key=read_key))


@pytest.fixture(scope="module")
def deployment(workdir: Path, catalog: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """IOC + 0MQ proxy + RE Manager (environment closed) wired to the catalog."""
    require_service(testing.redis_available(), f"Redis at {testing.REDIS_ADDR}")
    stack: list[Any] = []
    try:
        ioc = testing.start_simulated_ioc("default")
        stack.append(ioc)
        proxy = testing.start_zmq_proxy(log_dir=workdir / "logs")
        stack.append(proxy)
        env = testing.profile_env(ioc, catalog=catalog.uri, api_key=catalog.write_key,
                                  spool=workdir / "spool", zmq=proxy.in_address,
                                  figures=workdir / "figures")
        manager = testing.start_re_manager(env, log_dir=workdir / "logs")
        stack.append(manager)
        rm = manager.api()
        rm.environment_open()  # the worker loads the profile while the first tests run
        rm.close()
        yield SimpleNamespace(ioc=ioc, proxy=proxy, manager=manager, env=env)
    finally:
        for service in reversed(stack):
            service.stop()


def _history_results(rm: Any) -> list[dict[str, Any]]:
    return [item["result"] for item in rm.history_get()["items"]]


def _wait_status(rm: Any, condition: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = rm.status(reload=True)
        if condition(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s: {status}")
        time.sleep(0.05)


@contextmanager
def _relayed_events(address: str) -> Iterator[Any]:
    """A live count of the event documents the 0MQ proxy relays from ``address``.

    Yields a callable ``wait(n, timeout)`` that returns once ``n`` more events
    than at its previous call have been seen (what a pause needs to land
    mid-run however slowly the worker starts its plan).
    """
    import zmq

    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.setsockopt(zmq.RCVTIMEO, 100)
    socket.connect(f"tcp://{address}")
    seen = [0]
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            try:
                message = socket.recv()
            except zmq.Again:
                continue
            if message.split(b" ", 2)[1] in (b"event", b"event_page"):
                seen[0] += 1

    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    mark = [0]

    def wait(n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while seen[0] < mark[0] + n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} events not relayed in {timeout} s ({seen[0]} in all)")
            time.sleep(0.02)
        mark[0] = seen[0]

    try:
        yield wait
    finally:
        done.set()
        thread.join(5)
        socket.close(linger=0)


def _start_mid_run(rm: Any, item: Any, wait_events: Any) -> None:
    """Queue ``item``, start the queue, return once its run has relayed 2 events."""
    rm.item_add(item)
    rm.queue_start()
    _wait_status(rm, lambda s: s["re_state"] == "running", 60, "running")
    wait_events(2)


def _stored_events(cat: Any, uid: str) -> tuple[int, list[int], dict[str, Any]]:
    """(rows in the primary stream, their seq_nums, the stop document) of a stored run."""
    run = cat.run(uid)
    stop = dict(run.metadata.get("stop") or {})
    if "primary" not in run:
        return 0, [], stop
    table = cat.table(uid)
    rows = int(table.sizes.get("time", 0))
    seq = [int(s) for s in table["seq_num"].values] if "seq_num" in table.coords else []
    return rows, seq, stop


# ----------------------------------------------------------------------------- profile files

def _device_names(tree: dict[str, Any], prefix: str = "") -> set[str]:
    names: set[str] = set()
    for name, info in tree.items():
        names.add(prefix + name)
        names |= _device_names(info.get("components") or {}, f"{prefix}{name}.")
    return names


def test_profile_files_match_the_startup_code(tmp_path: Path) -> None:
    """The committed plan list is what the startup code gives; the groups match the profile."""
    from nvmri_bluesky.profile import MEASUREMENT_PLANS, SERVICE_PLANS, bound_plans

    fresh = testing.regenerate_existing_plans_and_devices(tmp_path / "epd.yaml")
    committed = yaml.safe_load(testing.EXISTING_PLANS_AND_DEVICES.read_text())
    regenerated = yaml.safe_load(fresh.read_text())
    stale = ("profile_collection/existing_plans_and_devices.yaml is stale: run "
             "`python -m nvmri_bluesky.testing regenerate`")
    # Plans exactly; devices by their trees of names (what the queue checks arguments against).
    assert committed["existing_plans"] == regenerated["existing_plans"], stale
    assert (_device_names(committed["existing_devices"])
            == _device_names(regenerated["existing_devices"])), stale
    plans = committed["existing_plans"]
    assert set(plans) == set(MEASUREMENT_PLANS) | set(SERVICE_PLANS)
    assert set(committed["existing_devices"]) == {"stage", "mw", "rf", "pulser", "counter",
                                                  "health"}
    # Every parameter has a real type (no string annotations) and a description.
    for name, plan in bound_plans(object()).items():
        for p in inspect.signature(plan).parameters.values():
            assert not isinstance(p.annotation, str), (name, p.name, p.annotation)
        described = {p["name"]: p for p in plans[name]["parameters"]}
        assert described.keys() == inspect.signature(plan).parameters.keys()
        assert plans[name].get("description"), name
        for p in described.values():
            assert "'" not in p.get("annotation", {}).get("type", ""), (name, p)
    groups = yaml.safe_load(testing.USER_GROUP_PERMISSIONS.read_text())["user_groups"]
    assert set(groups["operator"]["allowed_plans"]) == set(MEASUREMENT_PLANS) | set(SERVICE_PLANS)
    assert set(groups["user"]["allowed_plans"]) == set(MEASUREMENT_PLANS)
    assert set(groups["primary"]["allowed_plans"]) == set(MEASUREMENT_PLANS)
    assert groups["observer"]["allowed_plans"] == []


# ----------------------------------------------------------------------------- queue server

def test_user_groups_decide_what_may_be_queued(deployment: SimpleNamespace) -> None:
    from bluesky_queueserver_api import BPlan
    from bluesky_queueserver_api.comm_base import RequestFailedError

    manager = deployment.manager
    operator, user, observer = (manager.api(g) for g in ("operator", "user", "observer"))
    nameless = manager.api("primary")  # the qserver CLI's group, and the API's default
    try:
        assert set(user.plans_allowed()["plans_allowed"]) == set(
            operator.plans_allowed()["plans_allowed"]) - {"set_z_min", "set_source_power"}
        assert observer.plans_allowed()["plans_allowed"] == {}
        with pytest.raises(RequestFailedError, match="set_z_min"):
            user.item_add(BPlan("set_z_min", 2.0))
        with pytest.raises(RequestFailedError, match="set_source_power"):
            nameless.item_add(BPlan("set_source_power", "mw", -10.0))
        with pytest.raises(RequestFailedError, match="odmr_sweep"):
            observer.item_add(BPlan("odmr_sweep", 6.1e9, 6.35e9, 11))
        # An observer still sees the queue and the status.
        assert observer.status()["items_in_queue"] == 0
        assert observer.queue_get()["items"] == []
        # The operator may queue the service plan; bad arguments are refused at the door.
        with pytest.raises(RequestFailedError, match="z_min_nm"):
            operator.item_add(BPlan("set_z_min", "low"))
        added = operator.item_add(BPlan("set_z_min", 2.0))
        assert added["item"]["user_group"] == "operator"
        operator.item_remove(uid=added["item"]["item_uid"])
        assert operator.status(reload=True)["items_in_queue"] == 0
    finally:
        for rm in (operator, user, observer, nameless):
            rm.close()


def test_queue_runs_into_the_postgres_catalog_and_the_live_viewer(
        deployment: SimpleNamespace, catalog: SimpleNamespace, workdir: Path) -> None:
    """Three plans queued by a user complete; the catalog and `nvmri live` get every event."""
    from bluesky_queueserver_api import BPlan

    live_dir = workdir / "live"
    live = subprocess.Popen(
        [sys.executable, "-m", "nvmri_bluesky.cli", "live", "--address",
         deployment.proxy.out_address, "--out", str(live_dir), "--max-runs", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"})
    rm = deployment.manager.api("user", "alice")
    try:
        assert live.stdout is not None
        first = live.stdout.readline()
        assert "listening on" in first, first
        rm.wait_for_idle(timeout=120)  # the environment, opened by the fixture
        assert rm.status()["worker_environment_exists"], deployment.manager.log_tail(30)
        time.sleep(0.5)  # the viewer's 0MQ subscription has long reached the proxy
        items = [
            BPlan("odmr_sweep", 6.1e9, 6.35e9, 11, shots=10_000),
            BPlan("deer_raster", x=[-10, 10, 3], y=[-10, 10, 3], z=30.0,
                  rf_frequency_hz=DEER_RF_HZ),
            BPlan("rabi", [1e-8, 2e-8, 4e-8, 8e-8, 1.6e-7], 6.233e9, shots=10_000),
        ]
        rm.item_add_batch(items)
        rm.queue_start()
        rm.wait_for_idle(timeout=180)
        results = _history_results(rm)
        assert [r["exit_status"] for r in results] == ["completed"] * 3, results
        uids = [r["run_uids"][0] for r in results]
        expected = {uids[0]: 11, uids[1]: 9, uids[2]: 5}

        out, _ = live.communicate(timeout=60)
        assert live.returncode == 0, first + out
    finally:
        rm.close()
        if live.poll() is None:
            live.kill()
            live.wait()

    with catalog.open() as cat:
        assert {r.uid for r in cat.runs()} == set(expected)  # a fresh catalog: these runs only
        for uid, n in expected.items():
            rows, seq, stop = _stored_events(cat, uid)
            assert (rows, stop.get("exit_status")) == (n, "success"), (uid, rows, stop)
            assert sorted(seq) == list(range(1, n + 1))
            assert stop["num_events"]["primary"] == n
            start = cat.run(uid).metadata["start"]
            assert start["prefix"] == deployment.ioc.prefix
    # `nvmri live` saw every event of every run, and drew the raster.
    runs = {}
    for line in out.splitlines():
        if line.startswith("nvmri live: run "):
            fields = line.split()
            runs[fields[3]] = dict(f.split("=", 1) for f in fields[4:])
    assert {uid: int(r["events"]) for uid, r in runs.items()} == expected, out
    assert all(r["status"] == "success" for r in runs.values())
    figure = Path(runs[uids[1]]["figure"])
    assert figure.parent == live_dir and figure.stat().st_size > 10_000


def test_pause_resume_stop_and_abort_over_the_api(deployment: SimpleNamespace,
                                                  catalog: SimpleNamespace) -> None:
    from bluesky_queueserver_api import BPlan

    rm = deployment.manager.api("operator", "olga")
    # long enough (900 points, several seconds even at ~10 ms per point) that
    # every pause lands mid-run
    long_raster = BPlan("deer_raster", x=[-20, 20, 30], y=[-20, 20, 30], z=30.0,
                        rf_frequency_hz=DEER_RF_HZ)
    with _relayed_events(deployment.proxy.out_address) as wait_events:
        try:
            if not rm.status()["worker_environment_exists"]:
                if rm.status()["manager_state"] != "creating_environment":
                    rm.environment_open()
                rm.wait_for_idle(timeout=120)
            n_history = len(rm.history_get()["items"])

            # Deferred pause (at the next checkpoint), resume, immediate pause, stop.
            _start_mid_run(rm, long_raster, wait_events)
            rm.re_pause("deferred")
            rm.wait_for_idle_or_paused(timeout=60)
            status = rm.status(reload=True)
            assert (status["manager_state"], status["re_state"]) == ("paused", "paused"), status
            rm.re_resume()
            _wait_status(rm, lambda s: s["re_state"] == "running", 30, "running after resume")
            wait_events(2)
            rm.re_pause("immediate")
            rm.wait_for_idle_or_paused(timeout=60)
            assert rm.status(reload=True)["re_state"] == "paused"
            rm.re_stop()
            rm.wait_for_idle(timeout=60)
            stopped = _history_results(rm)[n_history]
            assert stopped["exit_status"] == "stopped", stopped

            # Abort: the run closes as aborted and the item goes back to the queue.
            assert rm.status(reload=True)["items_in_queue"] == 0  # a stopped plan is done
            _start_mid_run(rm, long_raster, wait_events)
            rm.re_pause("immediate")
            rm.wait_for_idle_or_paused(timeout=60)
            rm.re_abort()
            rm.wait_for_idle(timeout=60)
            aborted = _history_results(rm)[n_history + 1]
            assert aborted["exit_status"] == "aborted", aborted
            assert rm.status(reload=True)["items_in_queue"] == 1
            rm.queue_clear()
        finally:
            rm.close()

    with catalog.open() as cat:
        for result, status in ((stopped, "success"), (aborted, "abort")):
            uid = result["run_uids"][0]
            rows, seq, stop = _stored_events(cat, uid)
            assert stop.get("exit_status") == status, stop
            assert 0 < rows < 900 and stop["num_events"].get("primary") == rows
            assert sorted(seq) == list(range(1, rows + 1))


# ----------------------------------------------------------------------------- many writers

WRITER = r"""
import json, os, sys, time
from pathlib import Path
from bluesky import RunEngine
from nvmri_bluesky.catalog import open_catalog
from nvmri_bluesky.devices import make_devices
from nvmri_bluesky.profile import bound_plans

n, batch, rf, go = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
nv = make_devices(os.environ["NVMRI_PREFIX"])
RE = RunEngine({})
catalog = open_catalog(os.environ["NVMRI_CATALOG"], api_key=os.environ["NVMRI_API_KEY"])
# Small batches: every process appends to the server many times while the others do.
catalog.subscribe(RE, os.environ["NVMRI_SPOOL"], batch_size=batch)
plan = bound_plans(nv, ("deer_raster",))["deer_raster"]
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
uids = RE(plan((-10, 10, n), (-10, 10, n), 30.0, rf))
catalog.flush()
print(json.dumps({"uids": list(uids), "errors": catalog.writer_errors}), flush=True)
catalog.close()
"""


def test_three_runengines_write_to_one_catalog_at_once(catalog: SimpleNamespace,
                                                       workdir: Path) -> None:
    """Three RunEngine processes, each with its own IOC, write rasters at once; no event is lost."""
    n, batch = 4, 3
    go = workdir / "go"
    iocs = [testing.start_simulated_ioc("default") for _ in range(3)]
    writers: list[subprocess.Popen] = []
    try:
        for i, ioc in enumerate(iocs):
            env = testing.profile_env(ioc, catalog=catalog.uri, api_key=catalog.write_key,
                                      spool=workdir / f"spool-{i}")
            env["NVMRI_LIVE"] = "0"
            writers.append(subprocess.Popen([sys.executable, "-c", WRITER, str(n), str(batch),
                                             str(DEER_RF_HZ), str(go)],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, env=env))
        for w in writers:
            assert w.stdout is not None
            line = w.stdout.readline()
            assert line.strip() == "ready", line + w.stderr.read()
        go.touch()
        reports = []
        for w in writers:
            out, err = w.communicate(timeout=240)
            assert w.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        for ioc in iocs:
            ioc.stop()
    assert all(r["errors"] == [] for r in reports), reports
    uids = [r["uids"][0] for r in reports]
    with catalog.open() as cat:
        for uid in uids:
            rows, seq, stop = _stored_events(cat, uid)
            assert (rows, stop.get("exit_status")) == (n * n, "success"), (uid, rows, stop)
            assert sorted(seq) == list(range(1, n * n + 1))


# ----------------------------------------------------------------------------- overhead

def test_catalog_overhead_per_point(catalog: SimpleNamespace, workdir: Path) -> None:
    """The same raster with no catalog, the embedded one and the PostgreSQL one (docs numbers)."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.catalog", "overhead", "--n", "6", "--repeats", "1",
         "--catalog", catalog.uri, "--api-key", catalog.write_key], cwd=REPO,
        capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout)
    (workdir / "overhead.json").write_text(json.dumps(numbers, indent=1))
    print("catalog overhead:", json.dumps(numbers))
    assert set(numbers["ms_per_point"]) == {"none", "embedded", "postgresql"}
    # Writing happens on a worker thread; the run waits only for the final flush. Generous
    # bounds (a loaded 2-core machine): the numbers themselves go to docs/deployment.md.
    for label in ("embedded", "postgresql"):
        assert numbers["overhead_in_run_ms_per_point"][label] < 50.0, numbers
        assert numbers["stop_wait_s"][label] < 10.0, numbers
