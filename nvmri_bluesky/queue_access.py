"""bluesky-httpserver resource access: authenticated users -> queue-server user groups.

bluesky-httpserver authenticates a user (PAM, LDAP, OIDC or a dictionary),
gives them API scopes through their *roles* (``api_access``) and, for every
request that touches plans or devices, asks the ``resource_access`` policy for
the user's *group* in the RE Manager's ``user_group_permissions.yaml``. Its
stock policy puts everyone in one group; :class:`RoleGroups` derives the group
from the same user table the API policy uses (one table in the config, shared
with a YAML anchor), so the client never declares its group:

.. code-block:: yaml

    api_access:
      policy: bluesky_httpserver.authorization:DictionaryAPIAccessControl
      args:
        users: &users
          alice: {roles: operator}
          bob: {roles: user}
    resource_access:
      policy: nvmri_bluesky.queue_access:RoleGroups
      args:
        users: *users
        role_groups: {operator: operator, user: user, observer: observer}

A user with no role that maps to a group gets ``default_group``
(``observer``: may queue nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_GROUP = "observer"


class RoleGroups:
    """Resource access policy: the queue-server group of a user follows from their roles.

    Parameters
    ----------
    users : mapping
        ``{username: {"roles": role or [roles], ...}}`` (the ``users`` of
        ``DictionaryAPIAccessControl``).
    role_groups : mapping
        ``{role: group}``; the first of a user's roles found here decides.
    default_group : str
        Group of users without a mapped role.
    """

    def __init__(self, *, users: Mapping[str, Any] | None = None,
                 role_groups: Mapping[str, str] | None = None,
                 default_group: str = DEFAULT_GROUP) -> None:
        self._groups: dict[str, str] = {}
        role_groups = dict(role_groups or {})
        for username, info in (users or {}).items():
            roles = (info or {}).get("roles", [])
            roles = [roles] if isinstance(roles, str) else list(roles or [])
            group = next((role_groups[r] for r in roles if r in role_groups), None)
            if group is not None:
                self._groups[str(username)] = str(group)
        self._default_group = str(default_group)

    def get_resource_group(self, username: str) -> str:
        """The user group (``user_group_permissions.yaml``) of ``username``.

        Parameters
        ----------
        username : str
            As authenticated by bluesky-httpserver.

        Returns
        -------
        str
        """
        return self._groups.get(username, self._default_group)


#: Seconds bluesky-httpserver waits for the RE Manager's answer (its own default is 2 s).
ZMQ_TIMEOUT_RECV = 30.0


def serve(argv: list[str] | None = None) -> None:
    """``start-bluesky-httpserver`` with a longer wait for the RE Manager's answers.

    bluesky-httpserver 0.0.14 builds its 0MQ ``REManagerAPI`` with the default
    2 s receive timeout and has no setting for it; the manager validates a
    queued plan's arguments before it answers, which on a loaded machine takes
    longer, and the HTTP client then gets ``408 ZMQ communication error``
    although the item may have been queued. This entry point gives the server's
    ``REManagerAPI`` :data:`ZMQ_TIMEOUT_RECV` instead and then runs the stock
    server (same command-line options). Drop it once the timeout is configurable.

    Parameters
    ----------
    argv : list of str, optional
        The server's options (default ``sys.argv[1:]``).
    """
    import functools
    import sys

    import bluesky_httpserver.app as app
    from bluesky_httpserver.server import start_server

    app.REManagerAPI = functools.partial(app.REManagerAPI, timeout_recv=ZMQ_TIMEOUT_RECV)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    start_server()


if __name__ == "__main__":
    serve()
