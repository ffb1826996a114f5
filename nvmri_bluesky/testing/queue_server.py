"""The queue: bluesky's 0MQ proxy, the RE Manager with the profile, bluesky-httpserver."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.testing.ports import LOOPBACK, REDIS_ADDR, free_port, tcp_open, unique_name
from nvmri_bluesky.testing.profile import (
    EXISTING_PLANS_AND_DEVICES,
    HTTP_SERVER_CONFIG,
    STARTUP_DIR,
    USER_GROUP_PERMISSIONS,
)
from nvmri_bluesky.testing.services import (
    HttpService,
    Service,
    base_env,
    entry_point,
    spawn,
    stopped_on_failure,
)

__all__ = ["ZmqProxy", "start_zmq_proxy", "ReManager", "start_re_manager", "clear_redis",
           "HttpServer", "http_server_config", "start_http_server"]

_QS_MANAGER = "bluesky_queueserver.manager.start_manager:start_manager"
_ZMQ_PROXY = "bluesky.commandline.zmq_proxy:main"
_HTTP_SERVER = "nvmri_bluesky.queue_access:serve"  # start-bluesky-httpserver, 0MQ timeout 30 s


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
    cmd = [*entry_point(_ZMQ_PROXY), "--in-address", f"{LOOPBACK}:{in_port}",
           "--out-address", f"{LOOPBACK}:{out_port}"]
    process, log_path = spawn("zmq-proxy", cmd, base_env(), Path(log_dir) if log_dir else None)
    proxy = ZmqProxy(process, log_path, in_port, out_port)
    with stopped_on_failure(proxy):
        proxy.wait_until(lambda: tcp_open(in_port) and tcp_open(out_port), timeout,
                         "listening")
    return proxy


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
    cmd = [*entry_point(_QS_MANAGER),
           "--startup-dir", str(startup_dir),
           "--existing-plans-devices", str(existing_plans_and_devices),
           "--user-group-permissions", str(user_group_permissions),
           "--update-existing-plans-devices", update_existing,
           "--redis-addr", redis_addr, "--redis-name-prefix", redis_prefix,
           "--zmq-control-addr", f"tcp://{LOOPBACK}:{control_port}",
           "--zmq-info-addr", f"tcp://{LOOPBACK}:{info_port}",
           "--zmq-publish-console", "ON"]
    manager_env = base_env(env)
    public_key = None
    if encrypt:
        from bluesky_queueserver import generate_zmq_keys

        public_key, private_key = zmq_keys or generate_zmq_keys()
        manager_env["QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER"] = private_key
    process, log_path = spawn("re-manager", cmd, manager_env,
                               Path(log_dir) if log_dir else None)
    manager = ReManager(process, log_path, control_addr=f"tcp://{LOOPBACK}:{control_port}",
                        info_addr=f"tcp://{LOOPBACK}:{info_port}", redis_addr=redis_addr,
                        redis_prefix=redis_prefix, public_key=public_key)
    with stopped_on_failure(manager):
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
    return manager


class HttpServer(HttpService):
    """bluesky-httpserver in front of a :class:`ReManager`: logins, roles, groups.

    Attributes (besides :class:`HttpService`'s ``uri``)
    ----------------------------------------------------
    provider : str
        The login provider's name in the config (``/api/auth/provider/<provider>/token``).
    """

    def __init__(self, process: subprocess.Popen, log_path: Path, *, uri: str,
                 provider: str) -> None:
        super().__init__("http-server", process, log_path, uri)
        self.provider = provider

    def ready(self) -> bool:
        """True once the server answers ``/api`` (any HTTP status)."""
        return self._answers("/api", any_status=True)

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
    env = base_env()
    env.update(QSERVER_ZMQ_CONTROL_ADDRESS=manager.control_addr,
               QSERVER_ZMQ_INFO_ADDRESS=manager.info_addr,
               QSERVER_HTTP_SERVER_SERVER_SECRET_KEYS=secrets.token_hex(32),
               QSERVER_HTTP_SERVER_DATABASE_URI=f"sqlite:///{log_dir / 'http-server.sqlite'}")
    if manager.public_key:
        env["QSERVER_ZMQ_PUBLIC_KEY"] = manager.public_key
    cmd = [*entry_point(_HTTP_SERVER), "--config_path", str(config_path),
           "--host", LOOPBACK, "--port", str(port)]
    process, log_path = spawn("http-server", cmd, env, log_dir, cwd=log_dir)
    provider = data["authentication"]["providers"][0]["provider"]
    server = HttpServer(process, log_path, uri=f"http://{LOOPBACK}:{port}", provider=provider)
    with stopped_on_failure(server):
        server.wait_ready(timeout)
    return server

