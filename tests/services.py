"""The machine's services (Redis, PostgreSQL) for the facility tests."""

from __future__ import annotations

import os

import pytest


def require_service(ok: bool, what: str) -> None:
    """Go on if ``ok``; else skip, or fail under CI (where the machine starts every service)."""
    if ok:
        return
    message = f"{what} is not reachable; the facility tests need it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
