"""Catalog scopes per instrument: a run belongs to the instrument whose key wrote it.

The facility server's access policy (``profile_collection/tiled/config.yml``,
``access_control``). An instrument's API key is minted with an access tag
``service:nvmri-instrument-<name>`` (:func:`create_api_key` with ``instrument=``); tiled
hands a key's tags to the policy with every request.

- Creating a node with an instrument key tags it with the key's tags, whatever
  the client asked (a client cannot label its run as another instrument's).
- On a tagged node (a run and everything in it), writing and deleting need a
  key carrying one of the node's tags, or tiled admin scopes; every other key
  may read it (``read:metadata``, ``read:data``), as its own scopes allow.
- Untagged nodes (the catalog root, runs written before the policy) are
  governed by the key's scopes alone: any write key may add runs at the root.
- A key's own scopes still bound everything (a read-only key never writes).
"""

from __future__ import annotations

from typing import Any

from tiled.access_control.protocols import AccessPolicy, normalize_access_tags
from tiled.access_control.scopes import ALL_SCOPES

#: Prefix of the access tag of an instrument's key and runs. tiled creates the row of a
#: tag only for principal-style names (``service:``/``user:``) at write time; any other
#: tag must be defined in the catalog database first, so the instrument tag is one.
TAG_PREFIX = "service:nvmri-instrument-"
#: What any key may do on another instrument's run.
FOREIGN_SCOPES = frozenset({"read:metadata", "read:data"})
#: Scopes that make a key a tiled admin (may change any run).
ADMIN_SCOPES = frozenset({"admin:apikeys"})


def _tags(tags: Any) -> frozenset[str]:
    """tiled's normalized tag set; None (no tags) is the empty set."""
    return normalize_access_tags(tags or ())


def instrument_tag(name: str) -> str:
    """``service:nvmri-instrument-<name>``: the access tag of an instrument's key and runs."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"instrument name must be letters, digits, '-', '_' or '.': {name!r}")
    return f"{TAG_PREFIX}{name}"


class InstrumentAccessPolicy(AccessPolicy):
    """tiled access policy: instrument keys own the runs they create; everyone reads."""

    def __init__(self, **_: Any) -> None:
        pass

    async def init_node(self, principal: Any, authn_access_tags: Any, authn_scopes: Any,
                        access_tags: Any = None) -> tuple[bool, Any]:
        """Tags of a new node: the creating key's tags if it has any."""
        if authn_access_tags:
            tags = _tags(authn_access_tags)
            return tags != _tags(access_tags), tags
        return False, _tags(access_tags)

    async def modify_node(self, node: Any, principal: Any, authn_access_tags: Any,
                          authn_scopes: Any, access_tags: Any) -> tuple[bool, Any]:
        """Only admins change a node's tags; everyone else keeps them."""
        current = _tags(getattr(node, "access_tags", None))
        if access_tags is None or _tags(access_tags) == current:
            return False, current
        if not ADMIN_SCOPES.issubset(set(authn_scopes)):
            raise ValueError("only a tiled admin may change a run's instrument tags")
        return True, _tags(access_tags)

    async def allowed_scopes(self, node: Any, principal: Any, authn_access_tags: Any,
                             authn_scopes: Any) -> Any:
        """All scopes on own and untagged nodes; read scopes on another instrument's."""
        tags = _tags(getattr(node, "access_tags", None))
        if not tags or ADMIN_SCOPES.issubset(set(authn_scopes)):
            return ALL_SCOPES
        if authn_access_tags and tags & _tags(authn_access_tags):
            return ALL_SCOPES
        return FOREIGN_SCOPES

    async def filters(self, node: Any, principal: Any, authn_access_tags: Any,
                      authn_scopes: Any, scopes: Any) -> list:
        """No filtering: every key that may read sees every run."""
        return []
