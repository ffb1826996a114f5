"""The profile collection's files, the simulated IOC, and a profile process's environment."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvmri_bluesky.sim import launch
from nvmri_bluesky.testing.services import base_env

__all__ = ["PROFILE_DIR", "STARTUP_DIR", "EXISTING_PLANS_AND_DEVICES", "USER_GROUP_PERMISSIONS",
           "TILED_CONFIG", "HTTP_SERVER_CONFIG", "start_simulated_ioc", "profile_env"]

PROFILE_DIR = Path(__file__).resolve().parents[2] / "profile_collection"
"""The profile collection shipped beside the package."""
STARTUP_DIR = PROFILE_DIR / "startup"
"""The re-manager's ``--startup-dir``."""
EXISTING_PLANS_AND_DEVICES = PROFILE_DIR / "existing_plans_and_devices.yaml"
"""The list of plans and devices generated from the startup code."""
USER_GROUP_PERMISSIONS = PROFILE_DIR / "user_group_permissions.yaml"
"""Who may queue what: groups ``operator``, ``user``, ``observer``."""
TILED_CONFIG = PROFILE_DIR / "tiled" / "config.yml"
"""The facility tiled server's configuration."""
HTTP_SERVER_CONFIG = PROFILE_DIR / "httpserver" / "config.yml"
"""bluesky-httpserver's configuration: PAM login, roles, users -> queue-server groups."""


def start_simulated_ioc(scenario: Any = "default", prefix: str | None = None,
                        time_scale: float = 0.0, timeout: float = 60.0) -> launch.IocHandle:
    """Start the simulated IOC for another process (a re-manager, a RunEngine) to use.

    :func:`nvmri_bluesky.sim.launch.start_ioc` when this process's Channel
    Access client is not yet initialised (it also points this process at the
    IOC); otherwise the same IOC subprocess on a free port without touching
    this process's CA settings (a test process that already used CA for
    another IOC can still start IOCs for its subprocesses). Hand the IOC to a
    subprocess with ``launch.ioc_env(handle.port)`` and ``NVMRI_PREFIX``
    (:func:`profile_env`).

    Returns
    -------
    nvmri_bluesky.sim.launch.IocHandle
    """
    return launch.start_ioc(scenario, prefix=prefix, time_scale=time_scale, timeout=timeout,
                            configure_client=not launch.ca_initialised())


def profile_env(ioc: Any = None, *, prefix: str | None = None, port: int | None = None,
                catalog: str | None = "none", api_key: str | None = None,
                spool: str | Path | None = None, zmq: str | None = None,
                figures: str | Path | None = None,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a process that loads the profile (re-manager, IPython, RunEngine).

    Parameters
    ----------
    ioc : IocHandle, optional
        Gives ``prefix`` and ``port``.
    prefix, port : optional
        PV prefix (``NVMRI_PREFIX``) and CA search port of the IOC
        (``EPICS_CA_*`` via :func:`nvmri_bluesky.sim.launch.ioc_env`).
    catalog : str, optional
        ``NVMRI_CATALOG``: directory, ``http://`` URI or ``none``.
    api_key : str, optional
        ``NVMRI_API_KEY``.
    spool : path, optional
        ``NVMRI_SPOOL``.
    zmq : str, optional
        ``NVMRI_ZMQ``: ``host:port`` of a 0MQ proxy's input.
    figures : path, optional
        ``NVMRI_FIGURES``.
    base : mapping, optional
        Environment to start from (``os.environ``).
    """
    env = base_env(base)
    for name in ("NVMRI_CATALOG", "NVMRI_API_KEY", "NVMRI_SPOOL", "NVMRI_ZMQ", "NVMRI_FIGURES"):
        env.pop(name, None)
    if ioc is not None:
        prefix = prefix or ioc.prefix
        port = port or ioc.port
    if port is not None:
        env = launch.ioc_env(port, env)
        # ioc_env also sets the server-side EPICS_CAS_* variables; harmless for a client.
    if prefix:
        env["NVMRI_PREFIX"] = prefix
    if catalog is not None:
        env["NVMRI_CATALOG"] = str(catalog)
    for name, value in (("NVMRI_API_KEY", api_key), ("NVMRI_SPOOL", spool), ("NVMRI_ZMQ", zmq),
                        ("NVMRI_FIGURES", figures)):
        if value is not None:
            env[name] = str(value)
    return env
