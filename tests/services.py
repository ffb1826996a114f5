"""The machine's services (Redis, PostgreSQL) for the facility tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
"""The repository root: the working directory of ``python -m benchmarks.catalog``."""


def require_service(ok: bool, what: str) -> None:
    """Go on if ``ok``; else skip, or fail under CI (where the machine starts every service)."""
    if ok:
        return
    message = f"{what} is not reachable; the facility tests need it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_demo(tmp_path: Path, scenario: dict, *options: str, timeout: float = 1700.0
             ) -> tuple[subprocess.CompletedProcess, Path]:
    """``nvmri demo --scenario FILE --out DIR *options`` in a subprocess (the scenario
    written to ``tmp_path``; no inherited EPICS settings): (the process, DIR)."""
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, "-m", "nvmri_bluesky.cli", "demo", "--scenario",
                           str(path), "--out", str(out), *options],
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc, out
