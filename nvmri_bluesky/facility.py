"""Bring up the parts of a shared NV-MRI deployment as subprocesses on loopback.

Used by the facility tests and by ``docs/deployment.md``; each part can equally
be started by hand with the command its docstring names.

* :func:`start_simulated_ioc`: the instrument (``nvmri sim-ioc``).
* :func:`start_catalog_server`: the facility tiled server on PostgreSQL with
  API keys (``nvmri serve-catalog``), on a fresh set of databases.
* :func:`start_zmq_proxy`: bluesky's 0MQ proxy (``bluesky-0MQ-proxy``).
* :func:`start_re_manager`: bluesky-queueserver's RE Manager with the profile
  (``start-re-manager --startup-dir profile_collection/startup ...``) on the
  machine's Redis, under a name prefix of its own.
* :func:`regenerate_existing_plans_and_devices`: rewrite
  ``profile_collection/existing_plans_and_devices.yaml`` from the startup code
  against a simulated IOC (``python -m nvmri_bluesky.facility regenerate``).
* :func:`measure_catalog_overhead`: per-point cost of writing a raster to a
  catalog (``python -m nvmri_bluesky.facility overhead ...``).

Every server binds to 127.0.0.1 on a free port and runs in its own process
group, so :meth:`Service.stop` ends it and its children (the RE Manager's
worker) and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.sim.launch import ProcessHandle, stoppable_by_sigint

__all__ = [
    "PROFILE_DIR", "STARTUP_DIR", "EXISTING_PLANS_AND_DEVICES", "USER_GROUP_PERMISSIONS",
    "TILED_CONFIG", "REDIS_ADDR", "POSTGRES_URI", "LOOPBACK",
    "Service", "CatalogServer", "ZmqProxy", "ReManager", "HttpServer", "HTTP_SERVER_CONFIG",
    "free_port", "unique_name", "redis_available", "postgres_available",
    "start_simulated_ioc", "start_catalog_server", "start_zmq_proxy", "start_re_manager",
    "start_http_server", "http_server_config",
    "profile_env", "regenerate_existing_plans_and_devices", "measure_catalog_overhead",
    "write_raster", "bring_up", "bring_down",
    "drop_databases", "clear_redis",
]

PROFILE_DIR = Path(__file__).resolve().parents[1] / "profile_collection"
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
LOOPBACK = "127.0.0.1"
"""Every server started here listens on loopback only."""
REDIS_ADDR = os.environ.get("NVMRI_REDIS", f"{LOOPBACK}:6379")
"""The Redis server of the queue (``$NVMRI_REDIS`` overrides)."""
POSTGRES_URI = os.environ.get("NVMRI_TILED_PG", f"postgresql://postgres@{LOOPBACK}:5432")
"""The PostgreSQL server of the catalog, without a database (``$NVMRI_TILED_PG`` overrides)."""

_QS_MANAGER = "bluesky_queueserver.manager.start_manager:start_manager"
_QS_GEN_LISTS = "bluesky_queueserver.manager.gen_lists:gen_list_of_plans_and_devices_cli"
_ZMQ_PROXY = "bluesky.commandline.zmq_proxy:main"
_HTTP_SERVER = "nvmri_bluesky.queue_access:serve"  # start-bluesky-httpserver, 0MQ timeout 30 s


# ----------------------------------------------------------------------------- basics

def free_port() -> int:
    """A TCP port free on 127.0.0.1 (chosen by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def unique_name(stem: str = "nvmri") -> str:
    """A name no other test run or deployment uses, e.g. ``nvmri_3f9a1c2b``.

    Lower case letters, digits and ``_`` only: usable as a Redis name prefix
    and as a PostgreSQL database name prefix.
    """
    return f"{stem}_{os.getpid() % 0xFFFF:04x}{secrets.token_hex(3)}"


def _entry_point(target: str) -> list[str]:
    """``python -c`` command line that runs a console-script entry point ``module:function``."""
    module, func = target.split(":")
    return [sys.executable, "-c",
            f"import sys; from {module} import {func} as f; sys.exit(f())"]


def _tcp_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def redis_available(addr: str = REDIS_ADDR) -> bool:
    """True if a Redis server answers PING at ``host:port``."""
    import redis

    host, _, port = addr.partition(":")
    try:
        return bool(redis.Redis(host=host, port=int(port or 6379), socket_timeout=2).ping())
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


def postgres_available(uri: str = POSTGRES_URI) -> bool:
    """True if the PostgreSQL server at ``uri`` accepts a connection to ``postgres``."""
    import asyncio

    import asyncpg

    async def check() -> bool:
        conn = await asyncpg.connect(f"{uri.rstrip('/')}/postgres", timeout=5)
        await conn.close()
        return True

    try:
        return asyncio.run(check())
    except Exception:  # noqa: BLE001
        return False


class Service(ProcessHandle):
    """A server subprocess started here, in its own process group.

    Attributes
    ----------
    name : str
        What it is (for messages).
    process : subprocess.Popen
    log_path : Path
        Its combined stdout and stderr.
    """

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path) -> None:
        super().__init__(process, log_path)
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} {self._state()}>"

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` non-empty lines of its output."""
        return "\n".join(self._log_lines(lines))

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; raise ``NvmriError`` on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise NvmriError(f"{self.name} exited (code {self.process.returncode}) before "
                                 f"{what}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            if time.monotonic() > deadline:
                raise NvmriError(f"{self.name} not {what} after {timeout:g} s:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.2)

    def _send(self, sig: int) -> None:
        os.killpg(self.process.pid, sig)           # the whole group (e.g. its worker)

    def stop(self, timeout: float = 10.0) -> int | None:
        """End the process group: SIGINT, then SIGTERM, then SIGKILL; return the exit code."""
        if self._stopped:
            return self.process.returncode
        rc = self._terminate(timeout)
        # Children left in the group (e.g. a worker) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return rc


def _spawn(name: str, cmd: Sequence[str], env: Mapping[str, str], log_dir: Path | None,
           cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="nvmri-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(stoppable_by_sigint(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=dict(env),
                                   cwd=str(cwd) if cwd else None, start_new_session=True)
    return process, log_path


def _base_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ if env is None else env)
    out.setdefault("PYTHONUNBUFFERED", "1")
    out.setdefault("MPLBACKEND", "Agg")
    return out


# ----------------------------------------------------------------------------- the IOC

def start_simulated_ioc(scenario: Any = "default", prefix: str | None = None,
                        time_scale: float = 0.0, timeout: float = 60.0) -> Any:
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
    from nvmri_bluesky.sim import launch

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
    from nvmri_bluesky.sim.launch import ioc_env

    env = _base_env(base)
    for name in ("NVMRI_CATALOG", "NVMRI_API_KEY", "NVMRI_SPOOL", "NVMRI_ZMQ", "NVMRI_FIGURES"):
        env.pop(name, None)
    if ioc is not None:
        prefix = prefix or ioc.prefix
        port = port or ioc.port
    if port is not None:
        env = ioc_env(port, env)
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


# ----------------------------------------------------------------------------- catalog

class CatalogServer(Service):
    """The facility tiled server (``nvmri serve-catalog``) on its own PostgreSQL databases.

    Attributes
    ----------
    uri : str
        ``http://127.0.0.1:<port>``.
    db_prefix : str
        Databases ``<db_prefix>_catalog``, ``_storage``, ``_authn``.
    postgres : str
        The PostgreSQL server URI (no database).
    admin_password : str
        Password of the ``admin`` login that mints keys.
    data_dir : Path
        Array (zarr) storage.
    """

    def __init__(self, process: subprocess.Popen, log_path: Path, *, uri: str, db_prefix: str,
                 postgres: str, admin_password: str, data_dir: Path) -> None:
        super().__init__("catalog-server", process, log_path)
        self.uri = uri
        self.db_prefix = db_prefix
        self.postgres = postgres
        self.admin_password = admin_password
        self.data_dir = data_dir

    def ready(self) -> bool:
        """True once the server answers ``GET /api/v1/``."""
        try:
            with urllib.request.urlopen(f"{self.uri}/api/v1/", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 180.0) -> CatalogServer:
        """Block until the server answers (it creates its databases on first start)."""
        self.wait_until(self.ready, timeout, f"answering at {self.uri}")
        return self

    def create_api_key(self, scopes: Sequence[str] | None = None, note: str | None = None,
                       instrument: str | None = None) -> str:
        """Mint an API key with ``scopes`` (default: write scopes), maybe bound to an instrument."""
        from nvmri_bluesky.catalog import WRITE_SCOPES, create_api_key

        return create_api_key(self.uri, tuple(scopes or WRITE_SCOPES),
                              admin_password=self.admin_password, note=note,
                              instrument=instrument)

    def stop(self, timeout: float = 10.0, drop: bool = False) -> int | None:
        """Stop the server; with ``drop`` also drop its databases and data directory."""
        rc = super().stop(timeout)
        if drop:
            drop_databases(self.db_prefix, self.postgres)
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return rc


def start_catalog_server(*, port: int | None = None, db_prefix: str | None = None,
                         data_dir: str | Path | None = None, postgres: str = POSTGRES_URI,
                         config: str | Path = TILED_CONFIG, admin_password: str | None = None,
                         log_dir: str | Path | None = None, wait: bool = True,
                         timeout: float = 180.0) -> CatalogServer:
    """Start the facility tiled server on 127.0.0.1 with fresh PostgreSQL databases.

    The same as ``nvmri serve-catalog --config profile_collection/tiled/config.yml``
    with ``NVMRI_TILED_PG``, ``NVMRI_TILED_DB``, ``NVMRI_TILED_DATA_DIR``,
    ``NVMRI_TILED_SECRET_KEY`` and ``NVMRI_TILED_ADMIN_PASSWORD`` set.

    Parameters
    ----------
    port : int, optional
        Default: a free one.
    db_prefix : str, optional
        Database name prefix; default a unique one (new, empty databases).
    data_dir : path, optional
        Array storage; default a new temporary directory.
    postgres : str
        PostgreSQL server URI without database.
    config : path
        tiled server config.
    admin_password : str, optional
        Default: a random one (``CatalogServer.admin_password``).
    log_dir : path, optional
        Where ``catalog-server.log`` goes.
    wait : bool
        Wait until the server answers (else call :meth:`CatalogServer.wait_ready`).
    timeout : float
        Longest wait, s.
    """
    port = port or free_port()
    db_prefix = db_prefix or unique_name("nvmri")
    data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="nvmri-tiled-"))
    admin_password = admin_password or secrets.token_urlsafe(16)
    env = _base_env()
    env.update(NVMRI_TILED_PG=postgres.rstrip("/"), NVMRI_TILED_DB=db_prefix,
               NVMRI_TILED_DATA_DIR=str(data_dir), NVMRI_TILED_SECRET_KEY=secrets.token_hex(32),
               NVMRI_TILED_ADMIN_PASSWORD=admin_password)
    cmd = [sys.executable, "-m", "nvmri_bluesky.cli", "serve-catalog", "--config", str(config),
           "--host", LOOPBACK, "--port", str(port)]
    process, log_path = _spawn("catalog-server", cmd, env, Path(log_dir) if log_dir else None)
    server = CatalogServer(process, log_path, uri=f"http://{LOOPBACK}:{port}",
                           db_prefix=db_prefix, postgres=postgres.rstrip("/"),
                           admin_password=admin_password, data_dir=data_dir)
    if wait:
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop(drop=True)
            raise
    return server


def drop_databases(db_prefix: str, postgres: str = POSTGRES_URI) -> list[str]:
    """Drop the databases ``<db_prefix>_*`` (a test catalog's); return their names."""
    import asyncio

    import asyncpg

    if not db_prefix or not db_prefix.replace("_", "").isalnum():
        raise NvmriError(f"refusing to drop databases for prefix {db_prefix!r}")

    async def drop() -> list[str]:
        conn = await asyncpg.connect(f"{postgres.rstrip('/')}/postgres", timeout=10)
        try:
            rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1",
                                    db_prefix.replace("_", r"\_") + r"\_%")
            names = [r["datname"] for r in rows]
            for name in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return names
        finally:
            await conn.close()

    return asyncio.run(drop())


# ----------------------------------------------------------------------------- 0MQ proxy

class ZmqProxy(Service):
    """bluesky's 0MQ proxy: RunEngines publish to ``in_address``; viewers read ``out_address``."""

    def __init__(self, process: subprocess.Popen, log_path: Path, in_port: int,
                 out_port: int) -> None:
        super().__init__("zmq-proxy", process, log_path)
        self.in_port = in_port
        self.out_port = out_port

    @property
    def in_address(self) -> str:
        """``host:port`` for ``NVMRI_ZMQ`` / ``bluesky.callbacks.zmq.Publisher``."""
        return f"{LOOPBACK}:{self.in_port}"

    @property
    def out_address(self) -> str:
        """``host:port`` for ``nvmri live --address`` / ``RemoteDispatcher``."""
        return f"{LOOPBACK}:{self.out_port}"


def start_zmq_proxy(in_port: int | None = None, out_port: int | None = None,
                    log_dir: str | Path | None = None, timeout: float = 30.0) -> ZmqProxy:
    """Start ``bluesky-0MQ-proxy --in-address 127.0.0.1:IN --out-address 127.0.0.1:OUT``."""
    in_port = in_port or free_port()
    out_port = out_port or free_port()
    while out_port == in_port:
        out_port = free_port()
    cmd = [*_entry_point(_ZMQ_PROXY), "--in-address", f"{LOOPBACK}:{in_port}",
           "--out-address", f"{LOOPBACK}:{out_port}"]
    process, log_path = _spawn("zmq-proxy", cmd, _base_env(), Path(log_dir) if log_dir else None)
    proxy = ZmqProxy(process, log_path, in_port, out_port)
    try:
        proxy.wait_until(lambda: _tcp_open(in_port) and _tcp_open(out_port), timeout,
                         "listening")
    except BaseException:
        proxy.stop()
        raise
    return proxy


# ----------------------------------------------------------------------------- RE Manager

class ReManager(Service):
    """bluesky-queueserver's RE Manager with the NV-MRI profile.

    Attributes
    ----------
    control_addr, info_addr : str
        ``tcp://127.0.0.1:<port>`` of the control (requests) and info
        (console output) sockets, for ``REManagerAPI(zmq_control_addr=...)``.
    redis_addr, redis_prefix : str
        Its Redis server and key name prefix (keys ``<prefix>_plan_queue`` ...).
    public_key : str or None
        The control socket's 0MQ CURVE public key (clients need it); None if
        the manager runs without encryption.
    """

    def __init__(self, process: subprocess.Popen, log_path: Path, *, control_addr: str,
                 info_addr: str, redis_addr: str, redis_prefix: str,
                 public_key: str | None = None) -> None:
        super().__init__("re-manager", process, log_path)
        self.control_addr = control_addr
        self.info_addr = info_addr
        self.redis_addr = redis_addr
        self.redis_prefix = redis_prefix
        self.public_key = public_key

    def api(self, user_group: str = "operator", user: str | None = None, **kwargs: Any) -> Any:
        """A 0MQ ``REManagerAPI`` (with the manager's public key) as ``user`` of ``user_group``.

        Direct 0MQ access is the operator's back door (whoever holds the key
        names any group); users go through :class:`HttpServer`.
        """
        from bluesky_queueserver_api.zmq import REManagerAPI

        # The manager validates a queued plan's arguments before it answers;
        # on a busy 2-core machine that can exceed the API's 2 s default.
        kwargs.setdefault("timeout_recv", 30.0)
        kwargs.setdefault("zmq_public_key", self.public_key)
        rm = REManagerAPI(zmq_control_addr=self.control_addr, zmq_info_addr=self.info_addr,
                          **kwargs)
        rm.user_group = user_group
        rm.user = user or f"{user_group} (nvmri)"
        return rm

    def ready(self) -> bool:
        """True once the manager answers a status request."""
        rm = self.api(timeout_recv=1.0)
        try:
            return rm.status().get("manager_state") is not None
        finally:
            rm.close()

    def stop(self, timeout: float = 10.0, clear: bool = True) -> int | None:
        """Ask the manager to stop (``manager_stop safe_off``), end the group, clear its keys."""
        if self.alive and not self._stopped:
            with contextlib.suppress(Exception):
                rm = self.api(timeout_recv=2.0)
                try:
                    rm.send_request(method="manager_stop", params={"option": "safe_off"})
                finally:
                    rm.close()
                self.process.wait(timeout)
        rc = super().stop(timeout)
        if clear:
            clear_redis(self.redis_prefix, self.redis_addr)
        return rc


def clear_redis(prefix: str, addr: str = REDIS_ADDR) -> int:
    """Delete the Redis keys ``<prefix>_*`` of one re-manager; return how many."""
    import redis

    if not prefix:
        raise NvmriError("refusing to clear Redis keys without a name prefix")
    host, _, port = addr.partition(":")
    client = redis.Redis(host=host, port=int(port or 6379), socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}_*", count=500))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


def start_re_manager(env: Mapping[str, str], *, startup_dir: str | Path = STARTUP_DIR,
                     existing_plans_and_devices: str | Path = EXISTING_PLANS_AND_DEVICES,
                     user_group_permissions: str | Path = USER_GROUP_PERMISSIONS,
                     redis_addr: str = REDIS_ADDR, redis_prefix: str | None = None,
                     control_port: int | None = None, info_port: int | None = None,
                     update_existing: str = "NEVER", log_dir: str | Path | None = None,
                     open_environment: bool = False, timeout: float = 120.0,
                     zmq_keys: tuple[str, str] | None = None, encrypt: bool = True) -> ReManager:
    """Start ``start-re-manager`` with the profile on 127.0.0.1.

    Parameters
    ----------
    env : mapping
        The manager's (and so its worker's) environment: the IOC's CA settings
        and the profile's ``NVMRI_*`` variables (see :func:`profile_env`).
    startup_dir : path
        ``--startup-dir`` (the profile's ``startup/``).
    existing_plans_and_devices, user_group_permissions : path
        The profile's YAML files.
    redis_addr : str
        ``--redis-addr`` (``host:port``).
    redis_prefix : str, optional
        ``--redis-name-prefix``; default a unique one, so that parallel runs
        and deployments keep separate queues.
    control_port, info_port : int, optional
        Ports of ``--zmq-control-addr`` and ``--zmq-info-addr`` (default: free).
    update_existing : {"NEVER", "ENVIRONMENT_OPEN", "ALWAYS"}
        ``--update-existing-plans-devices``: ``NEVER`` keeps the profile's file
        as committed.
    log_dir : path, optional
        Where ``re-manager.log`` goes.
    open_environment : bool
        Also open the RE worker environment (runs the startup code) and wait for it.
    timeout : float
        Longest wait for the manager (and environment), s.
    zmq_keys : (public, private), optional
        The control socket's CURVE key pair (``qserver-zmq-keys``); default a new
        pair (``ReManager.public_key``). Clients without the public key get no answer.
    encrypt : bool
        False runs the control socket unencrypted (not for shared machines).
    """
    control_port = control_port or free_port()
    info_port = info_port or free_port()
    while info_port == control_port:
        info_port = free_port()
    redis_prefix = redis_prefix or unique_name("nvmri_qs")
    cmd = [*_entry_point(_QS_MANAGER),
           "--startup-dir", str(startup_dir),
           "--existing-plans-devices", str(existing_plans_and_devices),
           "--user-group-permissions", str(user_group_permissions),
           "--update-existing-plans-devices", update_existing,
           "--redis-addr", redis_addr, "--redis-name-prefix", redis_prefix,
           "--zmq-control-addr", f"tcp://{LOOPBACK}:{control_port}",
           "--zmq-info-addr", f"tcp://{LOOPBACK}:{info_port}",
           "--zmq-publish-console", "ON"]
    manager_env = _base_env(env)
    public_key = None
    if encrypt:
        from bluesky_queueserver import generate_zmq_keys

        public_key, private_key = zmq_keys or generate_zmq_keys()
        manager_env["QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER"] = private_key
    process, log_path = _spawn("re-manager", cmd, manager_env,
                               Path(log_dir) if log_dir else None)
    manager = ReManager(process, log_path, control_addr=f"tcp://{LOOPBACK}:{control_port}",
                        info_addr=f"tcp://{LOOPBACK}:{info_port}", redis_addr=redis_addr,
                        redis_prefix=redis_prefix, public_key=public_key)
    try:
        manager.wait_until(manager.ready, timeout, "answering requests")
        if open_environment:
            rm = manager.api()
            try:
                rm.environment_open()
                rm.wait_for_idle(timeout=timeout)
                if not rm.status()["worker_environment_exists"]:
                    raise NvmriError("the RE worker environment did not open (the profile "
                                     f"failed to load):\n{manager.log_tail(30)}")
            finally:
                rm.close()
    except BaseException:
        manager.stop()
        raise
    return manager


# ----------------------------------------------------------------------------- HTTP server

class HttpServer(Service):
    """bluesky-httpserver in front of a :class:`ReManager`: logins, roles, groups.

    Attributes
    ----------
    uri : str
        ``http://127.0.0.1:<port>``.
    provider : str
        The login provider's name in the config (``/api/auth/provider/<provider>/token``).
    """

    def __init__(self, process: subprocess.Popen, log_path: Path, *, uri: str,
                 provider: str) -> None:
        super().__init__("http-server", process, log_path)
        self.uri = uri
        self.provider = provider

    def ready(self) -> bool:
        """True once the server answers (any HTTP status)."""
        try:
            with urllib.request.urlopen(f"{self.uri}/api", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def api(self, username: str | None = None, password: str | None = None,
            **kwargs: Any) -> Any:
        """An HTTP ``REManagerAPI``, logged in as ``username`` (anonymous if None)."""
        from bluesky_queueserver_api.http import REManagerAPI

        kwargs.setdefault("timeout", 60.0)
        rm = REManagerAPI(http_server_uri=self.uri,
                          http_auth_provider=f"/{self.provider}/token", **kwargs)
        if username is not None:
            rm.login(username, password=password)
        return rm


def http_server_config(users: Mapping[str, tuple[str, str]] | None = None,
                       config: str | Path = HTTP_SERVER_CONFIG) -> dict[str, Any]:
    """The HTTP server's config, optionally with a dictionary login instead of PAM.

    Parameters
    ----------
    users : mapping, optional
        ``{username: (password, role)}``: replaces PAM by bluesky-httpserver's
        ``DictionaryAuthenticator`` (provider ``toy``) and the config's user
        table by these users (roles ``operator``, ``user`` or ``observer``).
    config : path
        The config to start from (the profile's).

    Returns
    -------
    dict
        The parsed YAML, changed as asked.
    """
    import yaml

    data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    if users is not None:
        data["authentication"]["providers"] = [{
            "provider": "toy",
            "authenticator": "bluesky_httpserver.authenticators:DictionaryAuthenticator",
            "args": {"users_to_passwords": {name: pw for name, (pw, _) in users.items()}},
        }]
        table = {name: {"roles": role} for name, (_, role) in users.items()}
        data["api_access"]["args"]["users"] = table
        data["resource_access"]["args"]["users"] = table
    return data


def start_http_server(manager: ReManager, *, users: Mapping[str, tuple[str, str]] | None = None,
                      config: str | Path = HTTP_SERVER_CONFIG, port: int | None = None,
                      log_dir: str | Path | None = None, timeout: float = 120.0) -> HttpServer:
    """Start ``start-bluesky-httpserver`` on 127.0.0.1 in front of ``manager``.

    Parameters
    ----------
    manager : ReManager
        Gives the control/info addresses and the control socket's public key.
    users : mapping, optional
        ``{username: (password, role)}`` for a dictionary login (tests, demos);
        default the config's PAM login and user table.
    config : path
        The server config (default ``profile_collection/httpserver/config.yml``).
    port : int, optional
        Default: a free one.
    log_dir : path, optional
        Where ``http-server.log`` and the effective config (mode 0600) go.
    timeout : float
        Longest wait for the server, s.
    """
    import yaml

    port = port or free_port()
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="nvmri-http-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    data = http_server_config(users, config)
    config_path = log_dir / "http-server-config.yml"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle)
    env = _base_env()
    env.update(QSERVER_ZMQ_CONTROL_ADDRESS=manager.control_addr,
               QSERVER_ZMQ_INFO_ADDRESS=manager.info_addr,
               QSERVER_HTTP_SERVER_SERVER_SECRET_KEYS=secrets.token_hex(32),
               QSERVER_HTTP_SERVER_DATABASE_URI=f"sqlite:///{log_dir / 'http-server.sqlite'}")
    if manager.public_key:
        env["QSERVER_ZMQ_PUBLIC_KEY"] = manager.public_key
    cmd = [*_entry_point(_HTTP_SERVER), "--config_path", str(config_path),
           "--host", LOOPBACK, "--port", str(port)]
    process, log_path = _spawn("http-server", cmd, env, log_dir, cwd=log_dir)
    provider = data["authentication"]["providers"][0]["provider"]
    server = HttpServer(process, log_path, uri=f"http://{LOOPBACK}:{port}", provider=provider)
    try:
        server.wait_until(server.ready, timeout, f"answering at {server.uri}")
    except BaseException:
        server.stop()
        raise
    return server


# ----------------------------------------------------------------------------- the plan list

_REGENERATE_NOTE = ("# Generated from profile_collection/startup by qserver-list-plans-devices:\n"
                    "#   python -m nvmri_bluesky.facility regenerate   (starts a simulated IOC)\n")

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
            cmd = [*_entry_point(_QS_GEN_LISTS), "--startup-dir", str(startup_dir),
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


# ----------------------------------------------------------------------------- overhead

def _stop_clock(marks: list[float]) -> Callable[[str, dict], None]:
    """A document callback appending the time of each stop document to ``marks``."""

    def note(name: str, doc: dict) -> None:
        if name == "stop":
            marks.append(time.perf_counter())

    return note


def measure_catalog_overhead(prefix: str, catalogs: Mapping[str, str | None],
                             api_key: str | None = None, n: int = 8, repeats: int = 2,
                             spool_dir: str | Path | None = None) -> dict[str, Any]:
    """Time the same raster with and without each catalog; the per-point overhead.

    Runs in this process, against the IOC at ``prefix`` (this process's CA
    environment must reach it). The raster is an ``esr_raster`` of ``n`` x
    ``n`` points (the cheapest raster, so the catalog's share shows).

    Parameters
    ----------
    prefix : str
        The IOC's PV prefix.
    catalogs : mapping
        ``{label: location}``; ``None`` is the baseline without a catalog,
        a directory an embedded catalog, an ``http://`` URI a facility one.
    api_key : str, optional
        Key for the facility catalog(s).
    n : int
        Points per axis.
    repeats : int
        Runs per catalog, taken in turn across catalogs; the fastest counts.
    spool_dir : path, optional
        Document spool directory (default: a temporary one).

    Returns
    -------
    dict
        ``{"points": n*n, "seconds": {label: s}, "ms_per_point": {label: ms},
        "stop_wait_s": {label: s the run waited at its stop document},
        "overhead_ms_per_point": {label: ms over the baseline},
        "overhead_in_run_ms_per_point": {label: the same without the wait at stop}}``.
    """
    from bluesky import RunEngine

    from nvmri_bluesky.catalog import open_catalog
    from nvmri_bluesky.devices import make_devices
    from nvmri_bluesky.profile import bound_plans

    devices = make_devices(prefix)
    plans = bound_plans(devices, ("esr_raster",))
    spool = Path(spool_dir) if spool_dir else Path(tempfile.mkdtemp(prefix="nvmri-spool-"))
    seconds: dict[str, float] = {}
    stop_wait: dict[str, float] = {}

    def raster() -> Any:
        return plans["esr_raster"]((-10, 10, n), (-10, 10, n), 30.0, 6.233e9)

    engines: dict[str, tuple[Any, list[float]]] = {}
    opened: list[Any] = []
    try:
        for label, location in catalogs.items():
            RE = RunEngine({})
            stopped_at: list[float] = []
            # Subscribed before the catalog: notes when the stop document leaves the plan,
            # so that the wait for the catalog writer at the stop is measured apart.
            RE.subscribe(_stop_clock(stopped_at))
            if location is not None:
                catalog = open_catalog(location, api_key=api_key if "://" in location else None)
                opened.append(catalog)
                catalog.subscribe(RE, spool / label)
            RE(raster())  # warm-up: first connections and imports
            engines[label] = (RE, stopped_at)
        # Round robin, fastest of ``repeats``: load that comes and goes hits every label alike.
        for _ in range(repeats):
            for label, (RE, stopped_at) in engines.items():
                stopped_at.clear()
                t0 = time.perf_counter()
                RE(raster())
                t1 = time.perf_counter()
                if t1 - t0 < seconds.get(label, float("inf")):
                    seconds[label], stop_wait[label] = t1 - t0, t1 - stopped_at[-1]
        for catalog in opened:
            if catalog.writer_errors:
                raise NvmriError(f"catalog {catalog.location}: {catalog.writer_errors[0]}")
    finally:
        for catalog in opened:
            catalog.close()
        devices.destroy()
    points = n * n
    per_point = {k: 1e3 * v / points for k, v in seconds.items()}
    base = next((per_point[k] for k, v in catalogs.items() if v is None), None)
    in_run = {k: 1e3 * (seconds[k] - stop_wait[k]) / points for k in seconds}
    base_in_run = next((in_run[k] for k, v in catalogs.items() if v is None), None)
    with_catalog = [k for k in seconds if catalogs[k] is not None]
    return {"points": points, "seconds": seconds, "ms_per_point": per_point,
            "stop_wait_s": stop_wait,
            "overhead_ms_per_point": ({k: per_point[k] - base for k in with_catalog}
                                      if base is not None else {}),
            "overhead_in_run_ms_per_point": ({k: in_run[k] - base_in_run for k in with_catalog}
                                             if base_in_run is not None else {})}


# ----------------------------------------------------------------------------- many writers

def write_raster(shape: tuple[int, int], rf_frequency_hz: float, batch_size: int,
                 go: str | Path | None = None, ordered: bool = True,
                 env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One RunEngine writing one locked ``deer_raster`` to the profile's catalog.

    The writer process of the concurrent-writers test and of
    ``python -m nvmri_bluesky.facility write-raster``: devices at
    ``$NVMRI_PREFIX`` (this process's CA environment must reach the IOC), the
    catalog ``$NVMRI_CATALOG`` with ``$NVMRI_API_KEY``, the spool in
    ``$NVMRI_SPOOL``. Prints ``ready`` and waits for the file ``go`` to
    exist, so that several writers start together.

    Parameters
    ----------
    shape : (nx, ny)
        Raster points along x and y (at z = 30 nm), so ``nx * ny`` events.
    rf_frequency_hz : float
        RF carrier, Hz.
    batch_size : int
        Catalog writer batch (events per write).
    go : path, optional
        Start when this file exists (default: at once).
    ordered : bool
        False writes with the stock TiledWriter (reproduces issue #12).
    env : mapping, optional
        Default ``os.environ``.

    Returns
    -------
    dict
        ``{"uids": [...], "spool": path, "errors": [...]}``.
    """
    from bluesky import RunEngine

    from nvmri_bluesky.catalog import default_api_key, default_location, open_catalog
    from nvmri_bluesky.devices import make_devices
    from nvmri_bluesky.profile import bound_plans

    env = dict(os.environ if env is None else env)
    devices = make_devices(env["NVMRI_PREFIX"], connection_timeout=120.0)  # a loaded machine
    RE = RunEngine({})
    catalog = open_catalog(default_location(env), api_key=default_api_key(env))
    try:
        catalog.subscribe(RE, env.get("NVMRI_SPOOL") or None, batch_size=batch_size,
                          ordered=ordered)
        raster = bound_plans(devices, ("deer_raster",))["deer_raster"]
        print("ready", flush=True)
        while go is not None and not Path(go).exists():
            time.sleep(0.01)
        uids = list(RE(raster((-10, 10, shape[0]), (-10, 10, shape[1]), 30.0,
                              rf_frequency_hz)))
        catalog.flush()
        spool = catalog.spool_path(uids[0]) if uids else None
        return {"uids": uids, "spool": str(spool), "errors": catalog.writer_errors}
    finally:
        catalog.close()
        devices.destroy()


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

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nvmri_bluesky.facility {regenerate,overhead}``."""
    parser = argparse.ArgumentParser(prog="python -m nvmri_bluesky.facility",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("regenerate", help="rewrite existing_plans_and_devices.yaml "
                                          "(starts a simulated IOC)")
    p.add_argument("--out", default=str(EXISTING_PLANS_AND_DEVICES))
    p = sub.add_parser("overhead", help="per-point cost of writing a raster to catalogs "
                                        "(starts a simulated IOC and a PostgreSQL catalog)")
    p.add_argument("--n", type=int, default=8, help="raster points per axis")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--catalog", default=None,
                   help="facility catalog URI (default: start one on fresh databases)")
    p.add_argument("--api-key", default=None)
    p = sub.add_parser("write-raster", help="write one deer_raster to $NVMRI_CATALOG "
                                            "(devices at $NVMRI_PREFIX); prints JSON")
    p.add_argument("--shape", default="50,40", help="nx,ny (default 50,40: 2000 points)")
    p.add_argument("--rf", type=float, default=3.4e9, help="RF carrier, Hz")
    p.add_argument("--batch", type=int, default=None, help="catalog batch size")
    p.add_argument("--go", default=None, help="start when this file exists")
    p.add_argument("--stock-writer", action="store_true",
                   help="the stock TiledWriter (reproduces issue #12)")
    p = sub.add_parser("up", help="start IOC, catalog, 0MQ proxy, RE Manager and HTTP server "
                                  "in order on 127.0.0.1; print their addresses; Ctrl-C stops")
    p.add_argument("--dir", default=None, help="logs and data (default: a new temp dir)")
    p.add_argument("--scenario", default="default")
    p.add_argument("--users", default=None,
                   help="dictionary login instead of PAM: name:password:role,... "
                        "(roles operator, user, observer)")
    args = parser.parse_args(argv)
    try:
        if args.command == "regenerate":
            print(regenerate_existing_plans_and_devices(args.out))
            return 0
        if args.command == "up":
            workdir = Path(args.dir or tempfile.mkdtemp(prefix="nvmri-up-"))
            services = bring_up(workdir, scenario=args.scenario, users=_parse_users(args.users))
            try:
                print(json.dumps({"dir": str(workdir), **_describe(services)}, indent=1),
                      flush=True)
                while all(s.alive for s in services):
                    time.sleep(1.0)
                print("a service stopped; stopping the rest", file=sys.stderr)
            except KeyboardInterrupt:
                pass
            finally:
                bring_down(services)
            return 0
        if args.command == "write-raster":
            from nvmri_bluesky.catalog import DEFAULT_BATCH_SIZE

            nx, ny = (int(v) for v in args.shape.split(","))
            result = write_raster((nx, ny), args.rf, args.batch or DEFAULT_BATCH_SIZE,
                                  go=args.go, ordered=not args.stock_writer)
            print(json.dumps(result), flush=True)
            return 0
        server = None
        if args.catalog is None:
            server = start_catalog_server(wait=False)
        ioc = start_simulated_ioc()
        try:
            key = args.api_key
            uri = args.catalog
            if server is not None:
                server.wait_ready()
                uri, key = server.uri, server.create_api_key()
            with tempfile.TemporaryDirectory(prefix="nvmri-overhead-") as tmp:
                result = measure_catalog_overhead(
                    ioc.prefix, {"none": None, "embedded": str(Path(tmp) / "catalog"),
                                 "postgresql": uri}, api_key=key, n=args.n,
                    repeats=args.repeats, spool_dir=Path(tmp) / "spool")
            print(json.dumps(result, indent=1))
        finally:
            ioc.stop()
            if server is not None:
                server.stop(drop=True)
    except NvmriError as err:
        print(f"nvmri facility: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
