"""The machine's services (Redis, PostgreSQL) for the facility tests."""

from __future__ import annotations

import os
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
