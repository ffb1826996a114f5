"""Addresses, free ports, unique names and the machine's Redis and PostgreSQL.

:data:`LOOPBACK` and :func:`free_port` are the package's own
(:mod:`nvmri_bluesky.net`); the rest is what the harness adds for servers
that run beside the IOC.
"""

from __future__ import annotations

import os
import secrets
import socket

from nvmri_bluesky.net import LOOPBACK, free_port

__all__ = ["LOOPBACK", "REDIS_ADDR", "POSTGRES_URI", "free_port", "unique_name", "tcp_open",
           "redis_available", "postgres_available"]

REDIS_ADDR = os.environ.get("NVMRI_REDIS", f"{LOOPBACK}:6379")
"""The Redis server of the queue (``$NVMRI_REDIS`` overrides)."""
POSTGRES_URI = os.environ.get("NVMRI_TILED_PG", f"postgresql://postgres@{LOOPBACK}:5432")
"""The PostgreSQL server of the catalog, without a database (``$NVMRI_TILED_PG`` overrides)."""


def unique_name(stem: str = "nvmri") -> str:
    """A name no other test run or deployment uses, e.g. ``nvmri_3f9a1c2b``.

    Lower case letters, digits and ``_`` only: usable as a Redis name prefix
    and as a PostgreSQL database name prefix.
    """
    return f"{stem}_{os.getpid() % 0xFFFF:04x}{secrets.token_hex(3)}"


def tcp_open(port: int, host: str = LOOPBACK) -> bool:
    """True if something accepts a TCP connection at ``host:port``."""
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
