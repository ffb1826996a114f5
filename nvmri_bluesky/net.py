"""Loopback addresses and free ports: the one definition for the whole package.

The simulated IOC (:mod:`nvmri_bluesky.sim.launch`), the embedded catalog
server (:mod:`nvmri_bluesky.catalog`) and the test harness
(its ``testing`` subpackage) all listen on :data:`LOOPBACK` and take their
ports from :func:`free_port`.
"""

from __future__ import annotations

import socket

__all__ = ["LOOPBACK", "free_port"]

LOOPBACK = "127.0.0.1"
"""The only interface the package's servers listen on."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (chosen by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
