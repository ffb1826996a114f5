"""MW and RF signal generators: frequency (Hz), power (dBm), output (Off/On).

Each setting is a setpoint PV with an ``_RBV`` readback (``MW:FREQ`` and
``MW:FREQ_RBV``, ...).  ``set()`` on any of them completes when the IOC has
completed the put and the readback shows the value
(:class:`~nvmri_bluesky.devices.setpoints.SetpointWithReadback`), so scanning
``mw.frequency`` records the frequency actually applied.

Data keys: ``mw_frequency`` (hinted, Hz); ``mw_power`` (dBm) and ``mw_output``
are configuration.  Frequency and power outside the IOC's control limits
raise :class:`~nvmri_bluesky.devices.setpoints.LimitExceeded` before any put.
"""

from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import Device

from nvmri_bluesky.devices.setpoints import SetpointWithReadback

__all__ = ["SignalGenerator"]


class SignalGenerator(Device):
    """A CW signal generator ``<prefix>FREQ``, ``POWER``, ``OUTPUT`` (+ ``_RBV``).

    Build it as ``SignalGenerator("NVMRI:MW:", name="mw")``.
    """

    frequency = Cpt(SetpointWithReadback, "FREQ_RBV", write_pv="FREQ", kind="hinted",
                    units="Hz", tolerance=1e-3, rtolerance=1e-12, limits=True)
    power = Cpt(SetpointWithReadback, "POWER_RBV", write_pv="POWER", kind="config",
                units="dBm", tolerance=1e-6, limits=True)
    output = Cpt(SetpointWithReadback, "OUTPUT_RBV", write_pv="OUTPUT", kind="config",
                 units="")

    def on(self) -> None:
        """Switch the output on and wait for the readback (blocking; plans use ``mv``)."""
        self.output.set(1).wait(10.0)

    def off(self) -> None:
        """Switch the output off and wait for the readback (blocking; plans use ``mv``)."""
        self.output.set(0).wait(10.0)
