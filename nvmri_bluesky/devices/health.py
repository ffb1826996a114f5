"""Health PVs for suspenders: laser/optics and stage.

``health.laser_ok`` and ``health.stage_ok`` are monitored enums whose value
is 0 when in fault and 1 when OK, so ``bluesky.suspenders.SuspendBoolLow``
works on them directly::

    RE.install_suspender(SuspendBoolLow(devices.health.laser_ok, sleep=1.0))
"""

from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import Device

from nvmri_bluesky.devices.signals import EpicsSignalROU

__all__ = ["Health"]


class Health(Device):
    """``<prefix>LASER_OK`` and ``<prefix>STAGE_OK`` (0 = fault, 1 = OK).

    Build it as ``Health("NVMRI:HEALTH:", name="health")``.
    """

    laser_ok = Cpt(EpicsSignalROU, "LASER_OK", auto_monitor=True, kind="normal", units="")
    stage_ok = Cpt(EpicsSignalROU, "STAGE_OK", auto_monitor=True, kind="normal", units="")

    @property
    def ok(self) -> bool:
        """True when every health PV reads OK."""
        return bool(self.laser_ok.get()) and bool(self.stage_ok.get())
