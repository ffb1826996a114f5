"""Channel Access access security of the simulated IOC: read for everyone, write for a few.

caproto asks every served PV ``check_access(hostname, username)`` when a
client creates a channel (the answer goes to the client as its access rights,
e.g. pyepics' ``PV.write_access``) and again on every write (``Forbidden``
if WRITE is missing). :func:`install` wraps that method of every PV with an
:class:`AccessPolicy`: read access stays what the PV allows (everyone), write
access is granted only to the listed users and/or hosts. Read-only PVs stay
read-only.

Configuration, by environment of the IOC process (``nvmri sim-ioc`` and
``python -m nvmri_bluesky.sim.ioc`` read it at start):

``NVMRI_CA_WRITE_USERS``
    Comma-separated user names allowed to write. Default: the user running the
    IOC. ``*`` allows every user.
``NVMRI_CA_WRITE_HOSTS``
    Comma-separated host names (as the client declares them) or IP addresses
    allowed to write. Default ``*`` (any host: the IOC listens on loopback, so
    only this machine reaches it).
``NVMRI_CA_INTERFACES``
    Comma-separated interfaces to listen on. Default ``127.0.0.1`` (loopback
    only); ``0.0.0.0`` opens it to the network (then name the hosts).

Like EPICS's own access security (``asCheckClientIP`` off), the user and host
names are what the client declares in its CA handshake: this keeps honest
clients of other users and machines from writing (the common accident), not a
determined attacker who forges the names. Against that, keep untrusted
accounts off the instrument's hosts and network.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ENV_WRITE_USERS = "NVMRI_CA_WRITE_USERS"
ENV_WRITE_HOSTS = "NVMRI_CA_WRITE_HOSTS"
ENV_INTERFACES = "NVMRI_CA_INTERFACES"
ANYONE = "*"
DEFAULT_INTERFACES = ("127.0.0.1",)


def _names(text: str | None) -> frozenset[str] | None:
    """``"a, b"`` -> ``{"a", "b"}`` (lower case); ``*`` -> None (anyone)."""
    items = [part.strip().lower() for part in (text or "").split(",") if part.strip()]
    if not items or ANYONE in items:
        return None
    return frozenset(items)


@dataclass(frozen=True)
class AccessPolicy:
    """Who may write: ``write_users`` and ``write_hosts`` (None = anyone); all may read.

    Attributes
    ----------
    write_users : frozenset of str or None
        Lower-case user names allowed to write.
    write_hosts : frozenset of str or None
        Lower-case host names or IP addresses allowed to write.
    """

    write_users: frozenset[str] | None
    write_hosts: frozenset[str] | None

    def may_write(self, hostname: str | None, username: str | None) -> bool:
        """True if this user on this host may write."""
        user_ok = self.write_users is None or (username or "").lower() in self.write_users
        host_ok = self.write_hosts is None or (hostname or "").lower() in self.write_hosts
        return user_ok and host_ok

    def describe(self) -> str:
        """One line for the IOC's startup message."""
        users = "any user" if self.write_users is None else ",".join(sorted(self.write_users))
        hosts = "any host" if self.write_hosts is None else ",".join(sorted(self.write_hosts))
        return f"CA writes: {users} on {hosts}; reads: everyone"


def policy_from_env(env: Mapping[str, str] | None = None) -> AccessPolicy:
    """The policy that ``NVMRI_CA_WRITE_USERS`` / ``NVMRI_CA_WRITE_HOSTS`` describe."""
    env = os.environ if env is None else env
    users = env.get(ENV_WRITE_USERS)
    if users is None:
        users = getpass.getuser()
    return AccessPolicy(write_users=_names(users), write_hosts=_names(env.get(ENV_WRITE_HOSTS)))


def interfaces_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """``NVMRI_CA_INTERFACES`` as a list (default: loopback only)."""
    env = os.environ if env is None else env
    items = [p.strip() for p in env.get(ENV_INTERFACES, "").split(",") if p.strip()]
    return items or list(DEFAULT_INTERFACES)


def _channels(pvdb: Mapping[str, Any] | Iterable[Any]) -> list[Any]:
    """Every ChannelData of ``pvdb``, record fields (``STAGE:X.LLM``) included, once each."""
    todo = list(pvdb.values() if isinstance(pvdb, Mapping) else pvdb)
    seen: dict[int, Any] = {}
    while todo:
        entry = todo.pop()
        if id(entry) in seen:
            continue
        seen[id(entry)] = entry
        todo.extend((getattr(entry, "fields", None) or {}).values())
    return list(seen.values())


def install(pvdb: Mapping[str, Any] | Iterable[Any], policy: AccessPolicy) -> int:
    """Make every PV of ``pvdb`` answer access checks through ``policy``.

    Parameters
    ----------
    pvdb : mapping of name -> ChannelData (or the ChannelData themselves)
        The IOC's PV database.
    policy : AccessPolicy

    Returns
    -------
    int
        How many PVs were wrapped.
    """
    from caproto import AccessRights

    count = 0
    for entry in _channels(pvdb):
        own = entry.check_access

        def check_access(hostname: str, username: str, _own: Any = own) -> Any:
            rights = _own(hostname, username)
            if not policy.may_write(hostname, username):
                rights &= ~AccessRights.WRITE
            return rights

        entry.check_access = check_access
        count += 1
    return count
