"""Four RunEngine processes write 2000-point rasters at once to one PostgreSQL tiled server.

Issue #12: with the stock TiledWriter, blocks of events came back paired with
the ``counter_counts`` of other events (the server's PostgreSQL tables have no
row order; see ``nvmri_bluesky/catalog/_writer.py``). Here every stored event
of every run is compared with its spool document (``verify_run``: seq_num,
time, every scalar, every array), in three rounds of four writers at once;
in each round two writers use the package's batch size and two batch 50, so
both sizes are written under four-way concurrency (6 runs of each size).
Each writer has its own simulated IOC (time scale 0).
Needs PostgreSQL at 127.0.0.1:5432; in CI its absence is a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from services import REPO, require_service

from nvmri_bluesky import testing
from nvmri_bluesky.catalog import (
    DEFAULT_BATCH_SIZE,
    READ_SCOPES,
    WRITE_SCOPES,
    open_catalog,
    verify_run,
)

pytestmark = [pytest.mark.facility, pytest.mark.timeout(1800)]

WRITERS = 4
SHAPE = (50, 40)  # 2000 points
ROUNDS = 3
RF_HZ = 3.4e9


def _require_postgres() -> None:
    require_service(testing.postgres_available(), f"PostgreSQL at {testing.POSTGRES_URI}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("concurrent")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[SimpleNamespace]:
    _require_postgres()
    catalog_server = testing.start_catalog_server(log_dir=workdir / "logs",
                                                  data_dir=workdir / "tiled-data", timeout=240)
    try:
        yield SimpleNamespace(uri=catalog_server.uri, log_tail=catalog_server.log_tail,
                              write_key=catalog_server.create_api_key(WRITE_SCOPES),
                              read_key=catalog_server.create_api_key(READ_SCOPES))
    finally:
        catalog_server.stop(drop=True)


@pytest.fixture(scope="module")
def iocs() -> Iterator[list[Any]]:
    handles = [testing.start_simulated_ioc("default") for _ in range(WRITERS)]
    try:
        yield handles
    finally:
        for handle in handles:
            handle.stop()


BATCHES = (DEFAULT_BATCH_SIZE, 50, DEFAULT_BATCH_SIZE, 50)  # one per writer


def _round(server: SimpleNamespace, iocs: list[Any], workdir: Path,
           label: str) -> list[dict[str, Any]]:
    """Start one writer per IOC, let them go at once, return their reports."""
    go = workdir / f"go-{label}"
    writers: list[subprocess.Popen] = []
    try:
        for i, (ioc, batch) in enumerate(zip(iocs, BATCHES, strict=True)):
            env = testing.profile_env(ioc, catalog=server.uri, api_key=server.write_key,
                                      spool=workdir / f"spool-{label}-{i}")
            writers.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.catalog", "write-raster",
                 "--shape", f"{SHAPE[0]},{SHAPE[1]}", "--rf", str(RF_HZ),
                 "--batch", str(batch), "--go", str(go)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
        for writer in writers:
            assert writer.stdout is not None
            line = writer.stdout.readline()
            assert line.strip() == "ready", line + writer.stderr.read()[-3000:]
        go.touch()
        reports = []
        for writer in writers:
            out, err = writer.communicate(timeout=900)
            assert writer.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()


def test_every_stored_event_equals_its_spool_document(server: SimpleNamespace, iocs: list[Any],
                                                      workdir: Path) -> None:
    points = SHAPE[0] * SHAPE[1]
    for round_ in range(ROUNDS):
        t0 = time.monotonic()
        reports = _round(server, iocs, workdir, f"r{round_}")
        t1 = time.monotonic()
        assert all(r["errors"] == [] for r in reports), (reports, server.log_tail(60))
        with open_catalog(server.uri, api_key=server.read_key) as catalog:
            for report in reports:
                result = verify_run(catalog, report["spool"])
                assert result.uid == report["uids"][0]
                assert result.events == points, result.summary()
                assert result.ok, "\n".join([result.summary(), *result.details])
        print(f"round {round_}: writing {t1 - t0:.0f} s, verifying {time.monotonic() - t1:.0f} s")
