"""Service plans: safety limits and source settings (operators only at a facility)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import bluesky.plan_stubs as bps

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.plans.checks import check_setting


def set_z_min(devices: Any, z_min_nm: float) -> Generator[Any, Any, None]:
    """Set the stage's lowest allowed apex height (the crash guard), nm.

    The IOC keeps its own hard floor; this soft limit can only tighten it.  A
    value outside the Z travel (the ``.LLM`` field's range) is refused before
    anything is put; a put the IOC refuses fails the plan with its reason.

    Parameters
    ----------
    devices
        The instrument.
    z_min_nm : float
        New lower soft limit of the Z axis, nm (> 0).

    Yields
    ------
    Msg
    """
    if not z_min_nm > 0:
        raise NvmriError(f"z_min_nm must be > 0 nm, got {z_min_nm!r}")
    check_setting(devices.stage.z.low_limit_travel, float(z_min_nm), "z_min_nm", "nm")
    yield from bps.mv(devices.stage.z.low_limit_travel, float(z_min_nm))


def set_source_power(devices: Any, source: str, power_dbm: float) -> Generator[Any, Any, None]:
    """Set the MW or RF source power, dBm (changes pulse calibrations).

    Parameters
    ----------
    devices
        The instrument.
    source : {"mw", "rf"}
    power_dbm : float

    Yields
    ------
    Msg
    """
    if source not in ("mw", "rf"):
        raise NvmriError(f"source must be 'mw' or 'rf', got {source!r}")
    yield from bps.mv(getattr(devices, source).power, float(power_dbm))
