"""The embedded catalog: TiledWriter + spool from a RunEngine, a second process, import."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky.plans import scan
from ophyd.sim import SynSignal, det, motor

from nvmri_bluesky.catalog import (
    SpoolWriter,
    import_spool,
    make_tiled_writer,
    open_catalog,
    read_spool,
    run_table,
    spool_files,
)
from nvmri_bluesky.catalog._reader import _documents_from_nodes
from nvmri_bluesky.cli import cli_import, cli_runs
from nvmri_bluesky.errors import NvmriError

NGATES = 6
SCALARS = ("lock_frequency", "lock_error", "deer_contrast")


def _signals(seed: int = 0) -> list[SynSignal]:
    rng = np.random.default_rng(seed)
    counts = SynSignal(func=lambda: rng.poisson(100.0, NGATES).astype(float), name="counter_counts")
    scalars = [SynSignal(func=rng.random, name=name) for name in SCALARS]
    return [counts, *scalars]


class Collector:
    """Keeps a JSON round-tripped copy of every document."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict]] = []

    def __call__(self, name: str, doc: dict) -> None:
        from nvmri_bluesky.catalog._spool import dumps_document

        record = json.loads(dumps_document(name, doc))
        self.docs.append((record["name"], record["doc"]))

    def run_docs(self, uid: str) -> list[tuple[str, dict]]:
        descs = {d["uid"] for n, d in self.docs if n == "descriptor" and d["run_start"] == uid}
        return [
            (n, d)
            for n, d in self.docs
            if (n == "start" and d["uid"] == uid)
            or (n in ("descriptor", "stop") and d["run_start"] == uid)
            or (n == "event" and d["descriptor"] in descs)
        ]

    def events(self, uid: str) -> list[dict]:
        return [d for n, d in self.run_docs(uid) if n == "event"]


@pytest.fixture
def RE():
    engine = RunEngine({})
    yield engine
    if engine.state != "idle":
        engine.halt()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One embedded catalog with a plain scan and a raster-like run with an array key."""
    root = tmp_path_factory.mktemp("embedded")
    RE = RunEngine({})
    collector = Collector()
    RE.subscribe(collector)
    with open_catalog(root / "catalog") as cat:
        tokens = cat.subscribe(RE, root / "spool", batch_size=4)
        assert len(tokens) == 2
        (uid_scan,) = RE(scan([det], motor, -1, 1, 7), scenario="single-spin")
        (uid_arr,) = RE(scan([det, *_signals()], motor, 0, 10, 13), scenario="layers")
        errors = list(cat.writer_errors)
        rows = cat.runs()
        table = run_table(cat.run(uid_arr[:8]))
        replay = list(cat.documents(uid_arr))
        rebuilt = list(_documents_from_nodes(cat.run(uid_arr)))
    return {
        "root": root,
        "catalog": root / "catalog",
        "spool": root / "spool",
        "uid_scan": uid_scan,
        "uid_arr": uid_arr,
        "collector": collector,
        "errors": errors,
        "rows": rows,
        "table": table,
        "replay": replay,
        "rebuilt": rebuilt,
    }


def test_writes_without_errors_and_lists_newest_first(written):
    assert written["errors"] == []
    rows = written["rows"]
    assert [r.uid for r in rows[:2]] == [written["uid_arr"], written["uid_scan"]]
    newest, older = rows[0], rows[1]
    assert (newest.plan, newest.scenario, newest.points, newest.status) == (
        "scan",
        "layers",
        13,
        "success",
    )
    assert (older.scenario, older.points) == ("single-spin", 7)


def test_scalar_and_array_keys_read_back(written):
    ds = written["table"]
    events = written["collector"].events(written["uid_arr"])
    assert ds.sizes["time"] == 13 and ds.sizes["gate"] == NGATES
    assert ds["counter_counts"].dims == ("time", "gate")
    expected_counts = np.array([e["data"]["counter_counts"] for e in events])
    np.testing.assert_array_equal(ds["counter_counts"].values, expected_counts)
    for key in ("motor", "det", *SCALARS):
        np.testing.assert_allclose(ds[key].values, [e["data"][key] for e in events])
    assert list(ds["seq_num"].values) == list(range(1, 14))
    assert ds.attrs["uid"] == written["uid_arr"] and ds.attrs["scenario"] == "layers"


def test_documents_replay_the_run(written):
    replay = written["replay"]
    names = [n for n, _ in replay]
    assert names[0] == "start" and names[-1] == "stop" and names.count("descriptor") >= 1
    events = [d for n, d in replay if n == "event"]
    original = written["collector"].events(written["uid_arr"])
    assert len(events) == len(original) == 13
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    for got, want in zip(events, original, strict=True):
        assert got["seq_num"] == want["seq_num"]
        assert got["data"]["counter_counts"] == want["data"]["counter_counts"]
        assert got["data"]["deer_contrast"] == pytest.approx(want["data"]["deer_contrast"])


def test_documents_rebuilt_without_the_exporter(written):
    """The fallback for servers without the JSON-seq exporter gives the same events."""
    exported = [d for n, d in written["replay"] if n == "event"]
    rebuilt = [d for n, d in written["rebuilt"] if n == "event"]
    assert [n for n, _ in written["rebuilt"]][:2] == ["start", "descriptor"]
    assert written["rebuilt"][-1][0] == "stop"
    assert [e["seq_num"] for e in rebuilt] == [e["seq_num"] for e in exported]
    for got, want in zip(rebuilt, exported, strict=True):
        assert got["data"]["counter_counts"] == want["data"]["counter_counts"]
        assert got["data"]["motor"] == pytest.approx(want["data"]["motor"])


def test_spool_holds_every_document(written):
    files = spool_files(written["spool"])
    assert len(files) == 2
    by_uid = {next(read_spool(f))[1]["uid"]: f for f in files}
    spooled = list(read_spool(by_uid[written["uid_arr"]]))
    collected = written["collector"].run_docs(written["uid_arr"])
    assert [n for n, _ in spooled] == [n for n, _ in collected]
    assert spooled == collected


def test_second_process_lists_and_reads(written):
    script = """
import json, sys
from nvmri_bluesky.catalog import open_catalog, run_table
from nvmri_bluesky.cli import cli_runs
with open_catalog(sys.argv[1]) as cat:
    ds = run_table(cat.run(sys.argv[2]))
    print(json.dumps({
        "table": cli_runs(sys.argv[1]),
        "uids": [r.uid for r in cat.runs()],
        "counts": ds["counter_counts"].values.tolist(),
        "motor": ds["motor"].values.tolist(),
    }))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(written["catalog"]), written["uid_arr"][:10]],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uids"][:2] == [written["uid_arr"], written["uid_scan"]]
    events = written["collector"].events(written["uid_arr"])
    assert out["counts"] == [e["data"]["counter_counts"] for e in events]
    assert out["motor"] == pytest.approx([e["data"]["motor"] for e in events])
    lines = out["table"].splitlines()
    assert lines[0].split() == ["uid", "time", "plan", "scenario", "points", "status"]
    assert lines[1].split()[0] == written["uid_arr"][:8]
    assert lines[1].split()[-3:] == ["layers", "13", "success"]


def test_run_lookup_errors_are_one_line(tmp_path):
    from event_model import compose_run

    with open_catalog(tmp_path / "cat") as cat:
        for uid in ("abcde111-0000-4000-8000-000000000000", "abcde222-0000-4000-8000-000000000000"):
            bundle = compose_run(uid=uid, metadata={"plan_name": "count"})
            writer = make_tiled_writer(cat.client)
            writer("start", bundle.start_doc)
            writer("stop", bundle.compose_stop())
        assert cat.run("abcde1").metadata["start"]["uid"].startswith("abcde111")
        for bad, pattern in (
            ("abcde", "ambiguous"),
            ("ffffffff", "no run 'ffffffff'"),
            ("a%b", "no run"),
        ):
            with pytest.raises(NvmriError, match=pattern) as info:
                cat.run(bad)
            assert "\n" not in str(info.value)
        with pytest.raises(NvmriError, match="no stream 'baseline'"):
            run_table(cat.run("abcde1"), "baseline")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_uri_fails_fast():
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(NvmriError, match="unreachable") as info:
        open_catalog(f"http://127.0.0.1:{port}", api_key="secret")
    assert time.monotonic() - t0 < 10
    assert "\n" not in str(info.value)


def test_spool_writer_converts_numpy(tmp_path):
    spool = SpoolWriter(tmp_path)
    start = {"uid": "u1", "time": 1.0, "arr": np.arange(3), "f32": np.float32(0.5)}
    spool("start", start)
    spool("descriptor", {"uid": "d1", "run_start": "u1", "name": "primary", "data_keys": {}})
    spool("event", {"descriptor": "d1", "seq_num": 1, "data": {"x": np.array([np.nan, 1.0])}})
    spool("stop", {"uid": "s1", "run_start": "u1", "exit_status": "success"})
    assert spool.errors == []
    docs = list(read_spool(spool.paths["u1"]))
    assert docs[0][1]["arr"] == [0, 1, 2] and docs[0][1]["f32"] == 0.5
    assert np.isnan(docs[2][1]["data"]["x"][0]) and docs[2][1]["data"]["x"][1] == 1.0
    assert [n for n, _ in docs] == ["start", "descriptor", "event", "stop"]


@pytest.fixture
def fast_tiled_retries(monkeypatch):
    """tiled retries a refused connection for 45 s by default; 2 tries in 2 s here."""
    import tiled.client.utils as tiled_utils

    monkeypatch.setattr(tiled_utils, "TILED_RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(tiled_utils, "TILED_RETRY_TIMEOUT", 2.0)


def test_server_killed_mid_run_spool_has_everything(tmp_path, RE, fast_tiled_retries):
    n_points, kill_at = 30, 12
    collector = Collector()
    RE.subscribe(collector)
    cat = open_catalog(tmp_path / "cat")
    cat.subscribe(RE, tmp_path / "spool", batch_size=5, stop_timeout=30)
    steps = []

    def per_step(detectors, step, pos_cache):
        steps.append(step)
        if len(steps) == kill_at:
            # Let the writer catch up first so the catalog holds a partial run
            # (start + some events), then the catalog dies; the RunEngine must
            # not notice.
            assert cat.flush(timeout=30)
            cat.server.close()
        yield from bps.one_nd_step(detectors, step, pos_cache)

    (uid,) = RE(scan([det, *_signals(1)], motor, 0, 1, n_points, per_step=per_step))
    assert RE.state == "idle"
    assert cat.writer_errors and all("\n" not in e for e in cat.writer_errors)
    spool_file = cat.spool_path(uid)
    cat.close()

    docs = list(read_spool(spool_file))
    assert sum(n == "event" for n, _ in docs) == n_points
    assert docs[-1][0] == "stop" and docs[-1][1]["exit_status"] == "success"

    # A fresh catalog gets the full run from the spool; a second import is a no-op.
    results = import_spool(spool_file, tmp_path / "fresh")
    assert [(r.uid, r.action, r.events) for r in results] == [(uid, "imported", n_points)]
    with open_catalog(tmp_path / "fresh") as fresh:
        ds = run_table(fresh.run(uid))
        assert ds.sizes["time"] == n_points
        expected = [e["data"]["counter_counts"] for e in collector.events(uid)]
        np.testing.assert_array_equal(ds["counter_counts"].values, expected)
        assert fresh.runs()[0].status == "success" and fresh.runs()[0].points == n_points
        assert [r.action for r in import_spool(tmp_path / "spool", fresh)] == ["present"]

    # The original catalog holds a partial run (no stop): import replaces it, once.
    with open_catalog(tmp_path / "cat") as original:
        assert original.runs()[0].status == "incomplete"
        assert [r.action for r in import_spool(spool_file, original)] == ["replaced"]
        assert run_table(original.run(uid)).sizes["time"] == n_points
        assert [r.action for r in import_spool(spool_file, original)] == ["present"]
        assert len(original.runs()) == 1


def test_import_truncated_spool_without_stop(tmp_path, RE):
    spool = SpoolWriter(tmp_path / "spool")
    RE.subscribe(spool)
    (uid,) = RE(scan([det, *_signals(2)], motor, 0, 1, 9), scenario="single-spin")
    path = spool.paths[uid]
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["name"] == "stop"
    # The process died while writing the 9th event: no stop, half a line.
    path.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][: len(lines[-2]) // 2])
    (tmp_path / "spool" / "notes.txt").write_text("not a spool file")

    text = cli_import(tmp_path / "spool", str(tmp_path / "cat"))
    assert uid[:8] in text and "imported" in text and "8 events" in text
    with open_catalog(tmp_path / "cat") as cat:
        row = cat.runs()[0]
        assert (row.uid, row.points, row.status) == (uid, 8, "abort")
        assert "spool ends without a stop" in cat.run(uid).metadata["stop"]["reason"]
        assert run_table(cat.run(uid)).sizes["time"] == 8
    table = cli_runs(str(tmp_path / "cat"))
    assert table.splitlines()[1].split()[-3:] == ["single-spin", "8", "abort"]


def test_cli_messages(tmp_path):
    with pytest.raises(NvmriError, match="no catalog at"):
        cli_runs(str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()
    open_catalog(tmp_path / "empty").close()
    assert cli_runs(str(tmp_path / "empty")).startswith("no runs in catalog")
    with pytest.raises(NvmriError, match="no spool file or directory"):
        cli_import(tmp_path / "missing", str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "start", "doc": {"uid": "x"}}\nnot json\n{"name": "stop"}\n')
    with pytest.raises(NvmriError, match="line 2 is not a document"):
        cli_import(bad, str(tmp_path / "empty"))
    assert Path(tmp_path / "empty" / "catalog.db").exists()


def test_gate_names_from_the_data_key(tmp_path):
    from event_model import compose_run

    bundle = compose_run(metadata={"plan_name": "deer_raster", "scenario": "single-spin"})
    keys = {
        "stage_x": {"source": "sim", "dtype": "number", "shape": [], "units": "nm"},
        "counter_counts": {
            "source": "sim",
            "dtype": "array",
            "shape": [3],
            "dtype_numpy": "<f8",
            "units": "counts",
            "gates": ["signal", "echo", "bright"],
        },
    }
    desc = bundle.compose_descriptor(data_keys=keys, name="primary")
    with open_catalog(tmp_path / "cat") as cat:
        writer = make_tiled_writer(cat.client)
        writer("start", bundle.start_doc)
        writer("descriptor", desc.descriptor_doc)
        for i in range(4):
            data = {"stage_x": float(i), "counter_counts": [10.0 * i, 1.0, 2.0]}
            event = desc.compose_event(data=data, timestamps={k: 1.0 for k in data}, seq_num=i + 1)
            writer("event", event)
        writer("stop", bundle.compose_stop())
        ds = run_table(cat.run(bundle.start_doc["uid"]))
    assert list(ds["gate"].values) == ["signal", "echo", "bright"]
    assert ds["counter_counts"].sel(gate="signal").values.tolist() == [0.0, 10.0, 20.0, 30.0]
    assert ds["stage_x"].attrs["units"] == "nm"


def test_spool_check_compares_numbers_exactly():
    """The spool check's scalar fast path: exact, NaN equals NaN, ints and floats by value."""
    from nvmri_bluesky.catalog._verify import _values_equal

    nan = float("nan")
    assert _values_equal(1, 1.0) and _values_equal(nan, nan) and _values_equal(-0.0, 0.0)
    assert _values_equal(2**53 + 1, float(2**53))          # compared as floats, as arrays are
    assert _values_equal(2**62, 2**62) and not _values_equal(2**62, 2**62 + 1)
    assert not _values_equal(1.0, 1.0 + 1e-16 * 4) and not _values_equal(nan, 1.0)
    assert _values_equal(True, 1.0) and _values_equal(np.float64(nan), nan)
    assert _values_equal([1.0, nan], [1, nan]) and not _values_equal([1.0], 1.0)
    assert _values_equal("a", "a") and not _values_equal("a", 1.0)
