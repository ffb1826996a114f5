"""This process's private Channel Access repeater (a daemon thread on loopback).

libca registers with a repeater to receive server beacons; :func:`start` runs
one on a free port, once per process, and :mod:`~.launch` points both the
client (``EPICS_CA_REPEATER_PORT``) and the IOCs' beacons at it.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from nvmri_bluesky.net import LOOPBACK

__all__ = ["start", "running_port"]

_port: int | None = None       # the repeater's port, once started


def running_port() -> int | None:
    """The port of this process's repeater, or None before :func:`start`."""
    return _port


def _repeat(sock: socket.socket) -> None:
    """A minimal CA repeater: confirm registrations, forward every other datagram (beacons).

    libca registers with a zero-length datagram or a ``REPEATER_REGISTER``
    message and expects ``REPEATER_CONFIRM`` (the EPICS repeater confirms
    both; caproto's only the second, so libca would keep complaining).
    """
    import caproto as ca

    register = 24                                      # CA_PROTO_REPEATER_REGISTER
    clients: set[tuple[str, int]] = set()
    while True:
        try:
            data, addr = sock.recvfrom(ca.MAX_UDP_RECV)
        except OSError:
            if sock.fileno() < 0:
                return
            continue
        if len(data) == 0 or (len(data) >= 16 and int.from_bytes(data[:2], "big") == register):
            clients.add(addr)
            with contextlib.suppress(OSError):
                sock.sendto(bytes(ca.RepeaterConfirmResponse(addr[0])), addr)
            continue
        for client in list(clients):
            if client != addr:
                try:
                    sock.sendto(data, client)
                except OSError:
                    clients.discard(client)


def start() -> int:
    """Run a CA repeater for this process on a free loopback port (a daemon thread).

    libca registers with a repeater to receive server beacons (used to
    reconnect quickly when an IOC comes back) and, finding none, tries to
    spawn ``caRepeater`` and then complains on stderr ("unable to contact CA
    repeater after 50 tries").  A private one per process also keeps other
    sessions' beacons out.
    """
    global _port
    if _port is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        sock.bind((LOOPBACK, 0))
        threading.Thread(target=_repeat, args=(sock,), name="nvmri-ca-repeater",
                         daemon=True).start()
        _port = sock.getsockname()[1]
    return _port
