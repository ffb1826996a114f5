"""Bring up the parts of a shared NV-MRI deployment as subprocesses on loopback.

The service harness of the facility tests and of ``docs/deployment.md`` (as
``ophyd_async.testing`` ships with ophyd-async); no module of the package
imports it. Each part can equally be started by hand with the command its
docstring names.

* :func:`start_simulated_ioc`: the instrument (``nvmri sim-ioc``), through
  :func:`nvmri_bluesky.sim.launch.start_ioc`.
* :func:`start_catalog_server`: the facility tiled server on PostgreSQL with
  API keys (``nvmri serve-catalog``), on a fresh set of databases.
* :func:`start_zmq_proxy`: bluesky's 0MQ proxy (``bluesky-0MQ-proxy``).
* :func:`start_re_manager`: bluesky-queueserver's RE Manager with the profile
  (``start-re-manager --startup-dir profile_collection/startup ...``) on the
  machine's Redis, under a name prefix of its own.
* :func:`start_http_server`: bluesky-httpserver in front of a RE Manager.
* :func:`bring_up`: all of them in order (``python -m nvmri_bluesky.testing up``).
* :func:`regenerate_existing_plans_and_devices`: rewrite
  ``profile_collection/existing_plans_and_devices.yaml`` from the startup code
  against a simulated IOC (``python -m nvmri_bluesky.testing regenerate``).

Modules: :mod:`.ports` (addresses, free ports, unique names, Redis and
PostgreSQL), :mod:`.services` (a server subprocess in its own process group),
:mod:`.profile` (the profile's files, the IOC, a profile process's
environment), :mod:`.catalog_server`, :mod:`.queue_server` (0MQ proxy, RE
Manager, HTTP server) and :mod:`.deployment` (the whole stack and the
command). The catalog overhead benchmark is ``benchmarks/catalog_overhead.py``.

Every server binds to 127.0.0.1 on a free port and runs in its own process
group, so :meth:`Service.stop` ends it and its children (the RE Manager's
worker) and nothing else.
"""

from nvmri_bluesky.testing.catalog_server import (
    CatalogServer,
    drop_databases,
    start_catalog_server,
)
from nvmri_bluesky.testing.deployment import (
    bring_down,
    bring_up,
    main,
    regenerate_existing_plans_and_devices,
)
from nvmri_bluesky.testing.ports import (
    LOOPBACK,
    POSTGRES_URI,
    REDIS_ADDR,
    free_port,
    postgres_available,
    redis_available,
    tcp_open,
    unique_name,
)
from nvmri_bluesky.testing.profile import (
    EXISTING_PLANS_AND_DEVICES,
    HTTP_SERVER_CONFIG,
    PROFILE_DIR,
    STARTUP_DIR,
    TILED_CONFIG,
    USER_GROUP_PERMISSIONS,
    profile_env,
    start_simulated_ioc,
)
from nvmri_bluesky.testing.queue_server import (
    HttpServer,
    ReManager,
    ZmqProxy,
    clear_redis,
    http_server_config,
    start_http_server,
    start_re_manager,
    start_zmq_proxy,
)
from nvmri_bluesky.testing.services import HttpService, Service

__all__ = [
    "PROFILE_DIR", "STARTUP_DIR", "EXISTING_PLANS_AND_DEVICES", "USER_GROUP_PERMISSIONS",
    "TILED_CONFIG", "REDIS_ADDR", "POSTGRES_URI", "LOOPBACK",
    "Service", "HttpService", "CatalogServer", "ZmqProxy", "ReManager", "HttpServer",
    "HTTP_SERVER_CONFIG",
    "free_port", "unique_name", "tcp_open", "redis_available", "postgres_available",
    "start_simulated_ioc", "start_catalog_server", "start_zmq_proxy", "start_re_manager",
    "start_http_server", "http_server_config",
    "profile_env", "regenerate_existing_plans_and_devices", "bring_up", "bring_down",
    "drop_databases", "clear_redis", "main",
]
