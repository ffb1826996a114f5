"""ophyd devices of the NV-MRI instrument, one module per kind, and their factory.

``make_devices(prefix)`` builds them all (:class:`Instrument`); the classes
can also be built one by one with their own prefixes.
"""

from nvmri_bluesky.devices.counter import PhotonCounter
from nvmri_bluesky.devices.factory import DEFAULT_PREFIX, Instrument, make_devices
from nvmri_bluesky.devices.health import Health
from nvmri_bluesky.devices.pulser import Pulser, program_json
from nvmri_bluesky.devices.setpoints import LimitExceeded
from nvmri_bluesky.devices.sources import SignalGenerator
from nvmri_bluesky.devices.stage import NmMotor, Stage, StageLimitError

__all__ = [
    "DEFAULT_PREFIX", "Health", "Instrument", "LimitExceeded", "NmMotor", "PhotonCounter",
    "Pulser",
    "SignalGenerator", "Stage", "StageLimitError", "make_devices", "program_json",
]
