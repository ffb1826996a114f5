"""Shared fixtures: a simulated IOC subprocess, the ophyd devices on it, a RunEngine.

Channel Access is configured here, at import, before anything imports ophyd
(``import ophyd`` initialises libca, which reads the EPICS environment once):
this test process searches a small pool of private loopback ports, so every
IOC a test starts (the session one and per-test ones with their own
scenario) is reachable, and parallel test runs never see each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from nvmri_bluesky.sim import launch
from nvmri_bluesky.threads import one_blas_thread

one_blas_thread()           # as the nvmri command does (nvmri_bluesky/threads.py)

POOL_SIZE = 6
"""CA search ports of this test process: the session IOC plus up to 5 per-test IOCs."""

SESSION_SCENARIO = "paper-fig2"
"""The session IOC's scenario: the paper's Fig. 2 tip, no dark spins (fast, clean ODMR)."""

if not launch.ca_initialised():
    _pool: list[int] = []
    for _ in range(POOL_SIZE):
        _pool.append(launch.find_free_port(exclude=_pool))
    launch.configure_ca_env(_pool)


@pytest.fixture(scope="session")
def ioc() -> Iterator[launch.IocHandle]:
    """The session's simulated IOC (``paper-fig2``, time scale 0, unique prefix, free port)."""
    with launch.start_ioc(SESSION_SCENARIO, time_scale=0.0) as handle:
        yield handle


@pytest.fixture(scope="session")
def devices(ioc: launch.IocHandle) -> Iterator[Any]:
    """``make_devices`` on the session IOC (stage, mw, rf, pulser, counter, health)."""
    from nvmri_bluesky.devices import make_devices

    instrument = make_devices(ioc.prefix)
    yield instrument
    instrument.destroy()


@pytest.fixture
def RE() -> Any:
    """A fresh RunEngine with no callbacks (no live plots, no BestEffortCallback)."""
    from bluesky import RunEngine

    engine = RunEngine({})
    yield engine
    if engine.state != "idle":
        engine.halt()


@pytest.fixture
def nvRE() -> Any:
    """The package's RunEngine (readable stop reasons), no callbacks."""
    from nvmri_bluesky.run_engine import RunEngine

    engine = RunEngine({})
    yield engine
    if engine.state != "idle":
        engine.halt()


@pytest.fixture
def collect(RE: Any) -> Callable[[Any], list[tuple[str, dict]]]:
    """``collect(plan)`` runs ``plan`` on ``RE`` and returns its ``(name, doc)`` pairs."""
    def run(plan: Any) -> list[tuple[str, dict]]:
        docs: list[tuple[str, dict]] = []
        token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
        try:
            RE(plan)
        finally:
            RE.unsubscribe(token)
        return docs

    return run


@pytest.fixture
def make_ioc() -> Iterator[Callable[..., tuple[launch.IocHandle, Any]]]:
    """Factory for per-test IOCs with their own scenario; torn down after the test.

    ``handle, devices = make_ioc(scenario, time_scale=0.0, connect=True)``:
    ``scenario`` is a built-in name, a JSON/YAML path, or a scenario dict;
    ``devices`` is None with ``connect=False``.
    """
    started: list[tuple[launch.IocHandle, Any]] = []

    def start(scenario: str | Path | Mapping[str, Any] = "paper-fig2", *,
              time_scale: float = 0.0, connect: bool = True,
              **kwargs: Any) -> tuple[launch.IocHandle, Any]:
        handle = launch.start_ioc(scenario, time_scale=time_scale, **kwargs)
        instrument = None
        try:
            if connect:
                from nvmri_bluesky.devices import make_devices

                instrument = make_devices(handle.prefix)
        except BaseException:
            handle.stop()
            raise
        started.append((handle, instrument))
        return handle, instrument

    yield start
    for handle, instrument in reversed(started):
        if instrument is not None:
            instrument.destroy()
        handle.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n N --dist loadgroup`` (``make test``) one worker runs a whole module.

    Modules share expensive module-scoped fixtures (a catalog server, a queue
    server deployment, IOCs), so each goes to one worker as a group; a module
    that sets ``XDIST_PER_TEST = True`` (independent end-to-end runs, each
    minutes long) has its tests spread over the workers one by one.
    """
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and not getattr(module, "XDIST_PER_TEST", False):
            item.add_marker(pytest.mark.xdist_group(module.__name__))
