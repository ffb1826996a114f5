"""A signal generator's PVs (``MW:``, ``RF:``): frequency, power, output, readbacks."""

from __future__ import annotations

import math

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.schema import short
from nvmri_bluesky.sim.ioc.records import post

__all__ = [
    "Source",
]

_ON_OFF = ("Off", "On")


class Source(PVGroup):
    """A signal generator: ``FREQ``, ``POWER``, ``OUTPUT`` and their ``_RBV``."""

    freq = pvproperty(name="FREQ", value=0.0, units="Hz", precision=1,
                      lower_ctrl_limit=1e5, upper_ctrl_limit=4e10, doc="carrier, Hz")
    freq_rbv = pvproperty(name="FREQ_RBV", value=0.0, units="Hz", precision=1,
                          read_only=True)
    power = pvproperty(name="POWER", value=0.0, units="dBm", precision=2,
                       lower_ctrl_limit=-120.0, upper_ctrl_limit=30.0, doc="power, dBm")
    power_rbv = pvproperty(name="POWER_RBV", value=0.0, units="dBm", precision=2,
                           read_only=True)
    output = pvproperty(name="OUTPUT", value="Off", dtype=ChannelType.ENUM,
                        enum_strings=_ON_OFF)
    output_rbv = pvproperty(name="OUTPUT_RBV", value="Off", dtype=ChannelType.ENUM,
                            enum_strings=_ON_OFF, read_only=True)

    def __init__(self, *args, source: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = getattr(self.parent.engine, source)

    @freq.startup
    async def freq(self, instance, async_lib):
        await instance.write(self.source.freq_hz)
        await self.freq_rbv.write(self.source.freq_hz)
        await self.power.write(self.source.power_dbm)
        await self.power_rbv.write(self.source.power_dbm)

    @freq.putter
    async def freq(self, instance, value):
        self.source.freq_hz = _finite(instance, value)
        await post(self.freq_rbv, value)

    @power.putter
    async def power(self, instance, value):
        self.source.power_dbm = _finite(instance, value)
        await post(self.power_rbv, value)

    @output.putter
    async def output(self, instance, value):
        self.source.on = value == "On"
        await post(self.output_rbv, value)


def _finite(instance, value: float) -> float:
    """``value`` if finite (caproto's limit check lets NaN through), else refuse the put."""
    if not math.isfinite(value):
        raise NvmriError(f"{instance.pvspec.name}: {short(value)} refused: not a finite number")
    return float(value)
