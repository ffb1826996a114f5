"""Build every device of the instrument from one PV prefix and wait for the connection.

::

    from nvmri_bluesky.devices import make_devices
    devices = make_devices("NVMRI:")          # NvmriError within ~30 s if nobody answers
    RE(bp.scan([devices.counter], devices.mw.frequency, 6.2e9, 6.3e9, 101))

The simulated IOC and a real one differ only in the prefix (and the CA
environment, see :mod:`nvmri_bluesky.sim.launch`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields

from ophyd import Device

from nvmri_bluesky.devices.counter import PhotonCounter
from nvmri_bluesky.devices.health import Health
from nvmri_bluesky.devices.pulser import Pulser
from nvmri_bluesky.devices.sources import SignalGenerator
from nvmri_bluesky.devices.stage import Stage
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.timeouts import timeout_s

__all__ = ["Instrument", "make_devices", "DEFAULT_PREFIX"]

DEFAULT_PREFIX = "NVMRI:"


@dataclass
class Instrument:
    """The instrument's ophyd devices, named as their data keys start.

    Attributes
    ----------
    stage : Stage
        ``stage_x``, ``stage_y``, ``stage_z``, nm.
    mw, rf : SignalGenerator
        MW source (NV drive) and RF source (dark spins).
    pulser : Pulser
        Pulse program, shots, gates.
    counter : PhotonCounter
        ``counter_counts``; its trigger is one acquisition.
    health : Health
        ``laser_ok``, ``stage_ok`` for suspenders.
    prefix : str
        The PV prefix they were built with.
    """

    stage: Stage
    mw: SignalGenerator
    rf: SignalGenerator
    pulser: Pulser
    counter: PhotonCounter
    health: Health
    prefix: str = DEFAULT_PREFIX

    def all(self) -> list[Device]:
        """Every device, in a fixed order (the queue server's device list)."""
        return [getattr(self, f.name) for f in fields(self) if f.name != "prefix"]

    def by_name(self) -> dict[str, Device]:
        """``{device.name: device}``, e.g. for a profile's namespace."""
        return {d.name: d for d in self.all()}

    def destroy(self) -> None:
        """Release every PV (channels, monitors) of every device."""
        for device in self.all():
            device.destroy()


def _build(prefix: str) -> Instrument:
    return Instrument(
        stage=Stage(f"{prefix}STAGE:", name="stage"),
        mw=SignalGenerator(f"{prefix}MW:", name="mw"),
        rf=SignalGenerator(f"{prefix}RF:", name="rf"),
        pulser=Pulser(f"{prefix}PG:", name="pulser"),
        counter=PhotonCounter(prefix, name="counter"),
        health=Health(f"{prefix}HEALTH:", name="health"),
        prefix=prefix,
    )


def _unconnected(instrument: Instrument) -> tuple[list[str], int]:
    """(PV names of the unconnected signals, number of distinct PVs)."""
    missing, every = set(), set()
    for device in instrument.all():
        for walk in device.walk_signals():
            pv = getattr(walk.item, "pvname", walk.item.name)
            every.add(pv)
            if not walk.item.connected:
                missing.add(pv)
    return sorted(missing), len(every)


def make_devices(prefix: str = DEFAULT_PREFIX,
                 connection_timeout: float | None = None) -> Instrument:
    """Build the instrument's devices on ``prefix`` and wait until every PV is connected.

    Parameters
    ----------
    prefix : str
        PV prefix of the instrument's IOC(s), e.g. ``"NVMRI:"``.
    connection_timeout : float, optional
        Longest wait for all PVs together, s (default
        :func:`~nvmri_bluesky.timeouts.timeout_s`, ``NVMRI_TIMEOUT_S`` or 30 s).

    Returns
    -------
    Instrument
        ``stage``, ``mw``, ``rf``, ``pulser``, ``counter``, ``health``;
        ``.all()`` lists them.

    Raises
    ------
    NvmriError
        One line, within about ``connection_timeout`` s, if some or all PVs do
        not answer (wrong prefix, IOC down, CA environment pointing elsewhere).
    """
    if not prefix or any(c.isspace() for c in prefix):
        raise NvmriError(f"invalid PV prefix {prefix!r}")
    if connection_timeout is None:
        connection_timeout = timeout_s()
    instrument = _build(prefix)
    deadline = time.monotonic() + connection_timeout
    try:
        for device in instrument.all():
            device.wait_for_connection(timeout=max(deadline - time.monotonic(), 0.05))
    except (TimeoutError, OSError) as exc:
        missing, total = _unconnected(instrument)
        instrument.destroy()
        where = (f"EPICS_CA_ADDR_LIST={os.environ.get('EPICS_CA_ADDR_LIST', '')!r}, "
                 f"EPICS_CA_SERVER_PORT={os.environ.get('EPICS_CA_SERVER_PORT', '5064')}")
        if not missing:
            raise NvmriError(f"cannot connect to the instrument at prefix {prefix!r}: "
                             f"{exc}") from None
        if len(missing) >= total:
            raise NvmriError(
                f"no IOC answers for prefix {prefix!r} within {connection_timeout:g} s "
                f"({len(missing)} PVs unconnected, e.g. {missing[0]}); is the IOC running "
                f"and is the prefix right? ({where})") from None
        raise NvmriError(
            f"the IOC at prefix {prefix!r} lacks {len(missing)} PV(s) after "
            f"{connection_timeout:g} s: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}") from None
    return instrument
