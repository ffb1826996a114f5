"""One setting for every connection, readiness and freshness timeout of the package.

A loaded machine (several sessions on two cores) makes Channel Access
connections, IOC start-up and monitor updates take seconds instead of
milliseconds.  Every such wait derives from :func:`timeout_s`:
``NVMRI_TIMEOUT_S`` in the environment (seconds, default
:data:`DEFAULT_TIMEOUT_S`).  A wait that only matters when something is wrong
(a connection that never comes, a refused put whose readback never arrives)
may be generous: a healthy instrument finishes long before it.
"""

from __future__ import annotations

import math
import os

from nvmri_bluesky.errors import NvmriError

__all__ = ["DEFAULT_TIMEOUT_S", "ENV_VAR", "timeout_s"]

DEFAULT_TIMEOUT_S = 30.0
"""Default of the base timeout, s."""
ENV_VAR = "NVMRI_TIMEOUT_S"
"""Environment variable that sets the base timeout, s."""


def timeout_s(fraction: float = 1.0) -> float:
    """The base timeout (``NVMRI_TIMEOUT_S``, default 30 s) times ``fraction``, s.

    Parameters
    ----------
    fraction : float
        Share of the base timeout this wait gets (e.g. 0.2 for a readback
        that follows a completed put).

    Raises
    ------
    NvmriError
        ``NVMRI_TIMEOUT_S`` is not a finite number > 0.
    """
    text = os.environ.get(ENV_VAR, "")
    if not text.strip():
        return DEFAULT_TIMEOUT_S * fraction
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise NvmriError(f"{ENV_VAR}={text[:40]!r} must be a number of seconds > 0")
    return value * fraction
