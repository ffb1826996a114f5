"""One embedded catalog directory, several processes: readers while a raster writes.

``nvmri demo --scenario paper-fig2 --quick`` writes the Fig. 2 calibration
runs, a writer process (its own simulated IOC) writes a small deer_raster and
exits, then a second writer process writes a long one. While it writes, other
processes use the same directory: ``nvmri runs``, ``nvmri replay`` and
``nvmri reconstruct`` (the ``nvmri`` command; it reconstructs the stored Ramsey
fringes), ``nvmri catalog verify``, and a stock tiled client and databroker
(``databroker.catalog['nvmri']``) through the profile the directory publishes
(``catalog[-1]``, ``run.documents()``, a stream read). None
may hit DuckDB's file lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from services import REPO

from nvmri_bluesky import testing
from nvmri_bluesky.catalog import open_catalog, verify_run

pytestmark = pytest.mark.timeout(900)


def _writer(ioc, directory: Path, shape: str, go: Path | None = None) -> subprocess.Popen:
    env = testing.profile_env(ioc, catalog=str(directory))
    cmd = [sys.executable, "-m", "benchmarks.catalog", "write-raster", "--shape", shape,
           "--batch", "20"]
    if go is not None:
        cmd += ["--go", str(go)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


def _nvmri(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVMRI_")}
    env["MPLBACKEND"] = "Agg"
    return subprocess.run([sys.executable, "-m", "nvmri_bluesky.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


def test_readers_share_the_catalog_while_a_raster_writes(tmp_path: Path) -> None:
    directory = tmp_path / "catalog"
    calibration = _nvmri("demo", "--scenario", "paper-fig2", "--quick", "--out",
                         str(tmp_path / "fig2"), "--catalog", str(directory), cwd=tmp_path)
    assert calibration.returncode == 0, calibration.stderr[-3000:]
    fig2 = json.loads((tmp_path / "fig2" / "report.json").read_text())
    ramsey = fig2["runs"]["paper-fig2/ramsey_line"]
    ioc = testing.start_simulated_ioc("default")
    writer = None
    try:
        first = _writer(ioc, directory, "6,5")
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
        uid = json.loads(out.strip().splitlines()[-1])["uids"][0]
        published = json.loads((directory / "server.json").read_text())
        assert published["pid"] is None  # the first writer stopped serving when it exited
        profile = (directory / "profiles" / "nvmri.yml").read_text()

        writer = _writer(ioc, directory, "100,100")  # long: 10000 points
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()[-3000:]
        serving = json.loads((directory / "server.json").read_text())
        assert serving["pid"] == writer.pid
        assert serving["port"] == published["port"]  # the same address as before
        assert (directory / "profiles" / "nvmri.yml").read_text() == profile

        runs = _nvmri("runs", "--catalog", str(directory), cwd=tmp_path)
        assert runs.returncode == 0, runs.stderr
        assert uid[:8] in runs.stdout and "deer_raster" in runs.stdout
        replay = _nvmri("replay", uid[:8], "--catalog", str(directory), "--out",
                        str(tmp_path / "replay"), cwd=tmp_path)
        assert replay.returncode == 0, replay.stderr
        assert any(Path(p).is_file() for p in replay.stdout.split())
        # The stored Ramsey line reconstructs to the demo's own fringe period ...
        recon = _nvmri("reconstruct", ramsey[:8], "--json", "--catalog", str(directory),
                       cwd=tmp_path)
        assert recon.returncode == 0, recon.stderr[-3000:]
        fringes = json.loads(recon.stdout)
        period = fringes["ramsey_fringe_period_nm"]
        assert period == fig2["ramsey_fringe_period_nm"], (period, fig2)
        assert fringes["gradient_gauss_per_nm"] == fig2["gradient_gauss_per_nm"], fringes
        assert abs(period["value"] - 0.33) <= 0.033 and 0 < period["sigma"] < 0.03, period
        # ... and a lone raster, with no PSF runs of its instrument, is refused with why.
        recon = _nvmri("reconstruct", uid[:8], "--catalog", str(directory), cwd=tmp_path)
        refusal = "the catalog has no psf_map or deer_spectrum"
        assert recon.returncode == 2 and refusal in recon.stderr, (
            recon.stderr)
        verify = _nvmri("catalog", "verify", uid[:8], "--catalog", str(directory),
                        cwd=tmp_path)
        assert verify.returncode == 0 and "1 run(s), 30 events compared" in verify.stdout, (
            verify.stdout + verify.stderr)

        stock = subprocess.run(
            [sys.executable, "-c",
             "import json; from tiled.client import from_profile\n"
             "c = from_profile('nvmri')\n"
             "last = c[-1]\n"
             f"docs = list(c['{uid}'].documents())\n"
             "import databroker\n"
             "db = databroker.catalog['nvmri']\n"
             f"table = db['{uid}']['primary'].read()\n"
             "print(json.dumps({'last': last.metadata['start']['uid'],\n"
             "  'names': [n for n, _ in docs], 'cls': type(c).__name__,\n"
             "  'db_cls': type(db).__name__, 'db_points': int(table.sizes['time'])}))"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "TILED_PROFILES": str(directory / "profiles")})
        assert stock.returncode == 0, stock.stderr[-3000:]
        seen = json.loads(stock.stdout.strip().splitlines()[-1])
        assert seen["cls"] == "CatalogOfBlueskyRuns"
        assert seen["last"] != uid  # catalog[-1] is the run being written now
        assert seen["names"][0] == "start" and seen["names"][-1] == "stop"
        assert seen["names"].count("event") == 30
        assert seen["db_cls"] == "CatalogOfBlueskyRuns" and seen["db_points"] == 30  # databroker
        assert writer.poll() is None, "the long raster ended before the readers were done"
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()  # dies serving: server.json names a dead process
            writer.wait(30)
        ioc.stop()

    # The next process finds the published server dead and serves the directory itself.
    with open_catalog(directory) as catalog:
        assert catalog.server is not None
        spool = next((directory / "spool").glob(f"*{uid}.jsonl"))
        result = verify_run(catalog, spool)
        assert result.ok and result.events == 30, result.details
        assert json.loads((directory / "server.json").read_text())["pid"] == os.getpid()
        RE_ids = [catalog.next_scan_id({}) for _ in range(2)]
        assert RE_ids[1] == RE_ids[0] + 1 and RE_ids[0] > 2  # after the two writers' runs
