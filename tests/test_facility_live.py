"""`nvmri live` (callbacks.remote): documents over a 0MQ proxy to another process's live slices.

No Redis or PostgreSQL needed: synthetic raster documents are published
through a real ``bluesky-0MQ-proxy`` subprocess to a real ``nvmri live``
subprocess.  The end-to-end version with the queue server and the IOC is in
``test_facility_deployment.py``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from event_model import compose_run

from nvmri_bluesky import testing
from nvmri_bluesky.callbacks.remote import LiveCounter, LiveSummary, run_live
from nvmri_bluesky.errors import NvmriError

pytestmark = pytest.mark.facility


def raster_documents(n: int, plan: str = "deer_raster") -> list[tuple[str, dict[str, Any]]]:
    """A complete n x n DEER raster run as the plans write it (start, descriptor, events, stop)."""
    bundle = compose_run(metadata={
        "plan_name": plan,
        "grid": {"shape": [1, n, n], "axes": ["stage_z", "stage_y", "stage_x"],
                 "extents": [[20.0, 20.0], [-10.0, 10.0], [-10.0, 10.0]], "snake": False},
        "f_nv0_hz": 6.233e9,
    })
    keys = {k: {"source": "sim", "dtype": "number", "shape": [], "units": u}
            for k, u in (("stage_x", "nm"), ("stage_y", "nm"), ("stage_z", "nm"),
                         ("deer_contrast", ""), ("lock_frequency", "Hz"))}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    docs: list[tuple[str, dict[str, Any]]] = [("start", bundle.start_doc),
                                              ("descriptor", desc.descriptor_doc)]
    step = 20.0 / (n - 1)
    for iy in range(n):
        for ix in range(n):
            data = {"stage_x": -10 + ix * step, "stage_y": -10 + iy * step, "stage_z": 20.0,
                    "deer_contrast": 0.1 * ((ix + iy) % 3), "lock_frequency": 6.233e9 + ix * 1e6}
            docs.append(("event", desc.compose_event(data=data,
                                                     timestamps=dict.fromkeys(data, time.time()))))
    docs.append(("stop", bundle.compose_stop(exit_status="success")))
    return docs


def test_counter_counts_events_and_pages_per_run() -> None:
    summary = LiveSummary()
    out = io.StringIO()
    counter = LiveCounter(summary, stream=out)
    a, b = raster_documents(3), raster_documents(2)
    # Interleave two runs; send run b's events as one event page.
    for name, doc in a[:4]:
        counter(name, doc)
    for name, doc in b[:2]:
        counter(name, doc)
    from event_model import pack_event_page

    counter("event_page", pack_event_page(*[d for n, d in b if n == "event"]))
    for name, doc in a[4:] + b[-1:]:
        counter(name, doc)
    assert [(r.plan_name, r.events, r.exit_status, r.num_events) for r in summary.runs] == [
        ("deer_raster", 9, "success", 9), ("deer_raster", 4, "success", 4)]
    assert summary.events == 13 and summary.stopped == 2
    assert out.getvalue().count("nvmri live: run ") == 2


def test_run_live_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(NvmriError, match="host:port"):
        run_live("5578", tmp_path)
    with pytest.raises(NvmriError, match="max_runs"):
        run_live("127.0.0.1:5578", tmp_path, max_runs=0)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[testing.ZmqProxy]:
    service = testing.start_zmq_proxy(log_dir=tmp_path / "logs")
    yield service
    service.stop()


def test_nvmri_live_receives_every_event_through_the_proxy(proxy: testing.ZmqProxy,
                                                          tmp_path: Path) -> None:
    from bluesky.callbacks.zmq import Publisher

    out_dir = tmp_path / "figures"
    live = subprocess.Popen(
        [sys.executable, "-m", "nvmri_bluesky.cli", "live", "--address", proxy.out_address,
         "--out", str(out_dir), "--max-runs", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"})
    publishers = [Publisher(proxy.in_address), Publisher(proxy.in_address)]
    try:
        assert live.stdout is not None
        first = live.stdout.readline()
        assert "listening on" in first, first
        time.sleep(1.0)  # publisher connections and the viewer's subscription settle
        a, b = raster_documents(5), raster_documents(4, plan="esr_raster")
        # Two RunEngines publishing at once: their documents interleave at the proxy.
        for i in range(max(len(a), len(b))):
            for pub, docs in zip(publishers, (a, b), strict=True):
                if i < len(docs):
                    pub(*docs[i])
        out, _ = live.communicate(timeout=60)
    finally:
        for pub in publishers:
            pub.close()
        if live.poll() is None:
            live.kill()
            live.wait()
    assert live.returncode == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("nvmri live: run ")]
    runs = {ln.split()[3]: dict(f.split("=", 1) for f in ln.split()[4:]) for ln in lines}
    assert {uid: int(r["events"]) for uid, r in runs.items()} == {
        a[0][1]["uid"]: 25, b[0][1]["uid"]: 16}, out
    figure = Path(runs[a[0][1]["uid"]]["figure"])
    assert figure.parent == out_dir and figure.stat().st_size > 5_000
