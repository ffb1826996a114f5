"""The whole deployment of ``docs/deployment.md`` in order, the plan list, and the command.

``python -m nvmri_bluesky.testing {regenerate,up}`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.testing.catalog_server import CatalogServer, start_catalog_server
from nvmri_bluesky.testing.profile import (
    EXISTING_PLANS_AND_DEVICES,
    STARTUP_DIR,
    profile_env,
    start_simulated_ioc,
)
from nvmri_bluesky.testing.queue_server import (
    HttpServer,
    ReManager,
    ZmqProxy,
    start_http_server,
    start_re_manager,
    start_zmq_proxy,
)
from nvmri_bluesky.testing.services import Service, entry_point

__all__ = ["regenerate_existing_plans_and_devices", "bring_up", "bring_down", "main"]

_QS_GEN_LISTS = "bluesky_queueserver.manager.gen_lists:gen_list_of_plans_and_devices_cli"

_REGENERATE_NOTE = ("# Generated from profile_collection/startup by qserver-list-plans-devices:\n"
                    "#   python -m nvmri_bluesky.testing regenerate   (starts a simulated IOC)\n")


def regenerate_existing_plans_and_devices(path: str | Path = EXISTING_PLANS_AND_DEVICES,
                                          startup_dir: str | Path = STARTUP_DIR,
                                          scenario: str = "default") -> Path:
    """Rewrite ``existing_plans_and_devices.yaml`` from the startup code.

    Starts a simulated IOC (the devices connect at startup), runs
    ``qserver-list-plans-devices --startup-dir STARTUP_DIR`` with the profile's
    environment pointing at it (no catalog, no live plots) and writes the
    result to ``path``.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    ioc = start_simulated_ioc(scenario)
    try:
        with tempfile.TemporaryDirectory(prefix="nvmri-qslist-") as tmp:
            env = profile_env(ioc, catalog="none")
            env["NVMRI_LIVE"] = "0"
            cmd = [*entry_point(_QS_GEN_LISTS), "--startup-dir", str(startup_dir),
                   "--file-dir", tmp, "--file-name", path.name]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                                    cwd=tmp)
            out = Path(tmp) / path.name
            if result.returncode != 0 or not out.exists():
                raise NvmriError("qserver-list-plans-devices failed:\n"
                                 + "\n".join((result.stdout + result.stderr).splitlines()[-20:]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_REGENERATE_NOTE + out.read_text())
    finally:
        ioc.stop()
    return path


# ----------------------------------------------------------------------------- the whole stack

def _parse_users(text: str | None) -> dict[str, tuple[str, str]] | None:
    """``"alice:PASSWORD:operator,bob:PASSWORD:user"`` -> ``{name: (password, role)}``."""
    if not text:
        return None
    users = {}
    for item in text.split(","):
        name, password, role = item.split(":", 2)
        users[name.strip()] = (password, role.strip())
    return users


def bring_up(workdir: str | Path, *, scenario: str = "default",
             users: Mapping[str, tuple[str, str]] | None = None,
             instrument: str = "nvmri") -> list[Service]:
    """Start the deployment of ``docs/deployment.md`` in order; return its services.

    The simulated IOC, the facility catalog server (fresh databases) with a
    write key bound to ``instrument``, the 0MQ proxy, the RE Manager (CURVE
    keys, the profile's catalog/spool/0MQ environment) and bluesky-httpserver
    (PAM login, or ``users`` for a dictionary login). Everything on 127.0.0.1;
    logs in ``workdir``. Stop them in reverse order (:func:`bring_down`).
    """
    from nvmri_bluesky.catalog import WRITE_SCOPES

    workdir = Path(workdir)
    started: list[Any] = []
    try:
        ioc = start_simulated_ioc(scenario)
        started.append(ioc)
        catalog = start_catalog_server(log_dir=workdir, data_dir=workdir / "tiled-data")
        started.append(catalog)
        key = catalog.create_api_key(WRITE_SCOPES, note=f"instrument {instrument}",
                                     instrument=instrument)
        proxy = start_zmq_proxy(log_dir=workdir)
        started.append(proxy)
        env = profile_env(ioc, catalog=catalog.uri, api_key=key, spool=workdir / "spool",
                          zmq=proxy.in_address, figures=workdir / "figures")
        manager = start_re_manager(env, log_dir=workdir)
        started.append(manager)
        started.append(start_http_server(manager, users=users, log_dir=workdir))
    except BaseException:
        bring_down(started)
        raise
    return started


def bring_down(services: Sequence[Any]) -> None:
    """Stop services in reverse order (the catalog server keeps its databases)."""
    for service in reversed(list(services)):
        with contextlib.suppress(Exception):
            service.stop()


def _describe(services: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for service in services:
        if isinstance(service, HttpServer):
            out["http_server"] = service.uri
        elif isinstance(service, ReManager):
            out.update(zmq_control=service.control_addr, zmq_info=service.info_addr,
                       zmq_public_key=service.public_key, redis_prefix=service.redis_prefix)
        elif isinstance(service, CatalogServer):
            out.update(catalog=service.uri, catalog_databases=f"{service.db_prefix}_*")
        elif isinstance(service, ZmqProxy):
            out.update(zmq_proxy_in=service.in_address, zmq_proxy_out=service.out_address)
        else:
            out.update(ioc_prefix=getattr(service, "prefix", None),
                       ioc_port=getattr(service, "port", None))
    return out


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nvmri_bluesky.testing",
                                     description="Bring up the parts of a shared NV-MRI "
                                                 "deployment as subprocesses on loopback.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("regenerate", help="rewrite existing_plans_and_devices.yaml "
                                          "(starts a simulated IOC)")
    p.add_argument("--out", default=str(EXISTING_PLANS_AND_DEVICES))
    p = sub.add_parser("up", help="start IOC, catalog, 0MQ proxy, RE Manager and HTTP server "
                                  "in order on 127.0.0.1; print their addresses; Ctrl-C stops")
    p.add_argument("--dir", default=None, help="logs and data (default: a new temp dir)")
    p.add_argument("--scenario", default="default")
    p.add_argument("--users", default=None,
                   help="dictionary login instead of PAM: name:password:role,... "
                        "(roles operator, user, observer)")
    return parser


def _up(args: argparse.Namespace) -> int:
    """Bring the deployment up, print its addresses, keep it up until Ctrl-C or a service ends."""
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="nvmri-up-"))
    services = bring_up(workdir, scenario=args.scenario, users=_parse_users(args.users))
    try:
        print(json.dumps({"dir": str(workdir), **_describe(services)}, indent=1), flush=True)
        while all(s.alive for s in services):
            time.sleep(1.0)
        print("a service stopped; stopping the rest", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        bring_down(services)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nvmri_bluesky.testing {regenerate,up}``."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "regenerate":
            print(regenerate_existing_plans_and_devices(args.out))
            return 0
        return _up(args)
    except NvmriError as err:
        print(f"nvmri testing: error: {err}", file=sys.stderr)
        return 2
