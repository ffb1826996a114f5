"""Helpers for ``profile_collection``: plans bound to one instrument.

Plans take the instrument as their first argument; an IPython session or a
queue server wants them with the instrument already in place, e.g.
``RE(deer_raster(x=(-10, 10, 21), y=(-10, 10, 21), z=20, rf_frequency_hz=3.4e9))``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from nvmri_bluesky import plans

MEASUREMENT_PLANS = (
    "odmr_sweep", "rabi", "ramsey", "echo", "deer_spectrum", "deer_evolution", "deer_point",
    "deer_raster", "psf_map", "ramsey_raster", "esr_raster",
)
"""Plans any user of the instrument may run."""
SERVICE_PLANS = ("set_z_min", "set_source_power")
"""Plans that change safety limits or source settings (operators only)."""


def bind(plan: Callable, devices: Any) -> Callable:
    """``plan`` with its first argument (the instrument) bound to ``devices``.

    The result is a generator function with the plan's name, docstring (less
    the ``devices`` parameter) and signature (less its first parameter), so
    IPython's help and the queue server show the real parameters.
    """

    def bound(*args: Any, **kwargs: Any):
        return (yield from plan(devices, *args, **kwargs))

    # Resolve string annotations (``from __future__ import annotations``) to types:
    # the queue server rebuilds each parameter's type from its repr.
    sig = inspect.signature(plan, eval_str=True)
    params = list(sig.parameters.values())[1:]
    bound.__signature__ = sig.replace(parameters=params)
    bound.__name__ = bound.__qualname__ = plan.__name__
    bound.__module__ = plan.__module__
    bound.__doc__ = re.sub(r"\n\s*devices\n\s+[^\n]*", "", plan.__doc__ or "", count=1)
    bound.__annotations__ = {p.name: p.annotation for p in params
                             if p.annotation is not inspect.Parameter.empty}
    if sig.return_annotation is not inspect.Signature.empty:
        bound.__annotations__["return"] = sig.return_annotation
    return bound


def bound_plans(devices: Any, names: tuple[str, ...] = MEASUREMENT_PLANS + SERVICE_PLANS
                ) -> dict[str, Callable]:
    """``{name: plan bound to devices}`` for a profile's namespace."""
    return {name: bind(getattr(plans, name), devices) for name in names}


def _in_queue_server() -> bool:
    try:
        from bluesky_queueserver import is_re_worker_active
    except ImportError:
        return False
    return bool(is_re_worker_active())


def subscribe_callbacks(RE: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Subscribe the session's callbacks to ``RE`` as the environment asks.

    ``NVMRI_CATALOG``: catalog directory or tiled URI (default
    ``~/.local/share/nvmri/catalog``; ``none`` for no catalog);
    ``NVMRI_API_KEY``: its API key; ``NVMRI_SPOOL``: document spool directory
    (default: ``spool`` beside an embedded catalog, else ``~/.local/share/nvmri/spool``);
    ``NVMRI_FIGURES``: where live figures are saved (default ``./nvmri-figures``);
    ``NVMRI_ZMQ``: ``host:port`` of a 0MQ proxy to publish documents to;
    ``NVMRI_LIVE``: ``0`` turns off the live plot and progress line (they are
    off in a queue-server worker anyway).

    Returns
    -------
    dict
        What was subscribed (``slices``, ``progress``, ``catalog``, ``publisher``).
    """
    import os

    from nvmri_bluesky.callbacks import LiveSlices, Progress

    env = dict(os.environ if env is None else env)
    out: dict[str, Any] = {}
    if env.get("NVMRI_LIVE", "1") != "0" and not _in_queue_server():
        out["slices"] = LiveSlices(out_dir=env.get("NVMRI_FIGURES", "nvmri-figures"))
        out["progress"] = Progress()
        RE.subscribe(out["slices"])
        RE.subscribe(out["progress"])
    from nvmri_bluesky.catalog import default_api_key, default_location, default_spool_dir

    location = default_location(env)
    if location.lower() != "none":
        from nvmri_bluesky.catalog import open_catalog

        out["catalog"] = open_catalog(location, api_key=default_api_key(env))
        out["catalog"].subscribe(RE, default_spool_dir(location, env))
    if env.get("NVMRI_ZMQ"):
        from bluesky.callbacks.zmq import Publisher

        out["publisher"] = Publisher(env["NVMRI_ZMQ"])
        RE.subscribe(out["publisher"])
    return out


def summary(devices: Any, callbacks: dict[str, Any]) -> str:
    """A few lines telling a new session what it has."""
    lines = [f"nvmri_bluesky: instrument at prefix {devices.prefix!r}",
             "  devices: " + ", ".join(d.name for d in devices.all()),
             "  plans:   " + ", ".join(MEASUREMENT_PLANS),
             "  service: " + ", ".join(SERVICE_PLANS),
             "  callbacks: " + (", ".join(callbacks) or "none"),
             "  e.g. RE(odmr_sweep(6.1e9, 6.35e9, 101))"]
    return "\n".join(lines)


def short_errors(shell: Any = None) -> bool:
    """In IPython, show an :class:`NvmriError` as one line; the traceback stays behind ``%tb``.

    A refused plan (a limit, a refused put, a lost IOC) then reads
    ``NvmriError: stage_z: 2 nm is below the low limit 5 nm ...`` instead of
    ~200 lines of RunEngine internals.

    Parameters
    ----------
    shell : InteractiveShell, optional
        Default: the running IPython shell, if any.

    Returns
    -------
    bool
        True if installed (False outside IPython).
    """
    import sys

    from nvmri_bluesky.errors import NvmriError

    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None:
        return False

    def handler(_shell: Any, etype: type, value: BaseException, tb: Any,
                tb_offset: int | None = None) -> None:
        sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb
        first = str(value).splitlines()[0] if str(value) else ""
        print(f"{etype.__name__}: {first}   (full traceback: %tb)", file=sys.stderr)

    shell.set_custom_exc((NvmriError,), handler)
    return True
