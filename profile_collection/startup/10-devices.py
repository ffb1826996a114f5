# The instrument's ophyd devices, from one PV prefix (default: the simulated IOC's), and
# the instrument-time clock: every run's stop document carries its instrument time.
from nvmri_bluesky.devices import make_devices
from nvmri_bluesky.plans.accounting import InstrumentClock

nv = make_devices(os.environ.get("NVMRI_PREFIX", "NVMRI:"))  # noqa: F821
stage, mw, rf, pulser, counter, health = nv.stage, nv.mw, nv.rf, nv.pulser, nv.counter, nv.health
InstrumentClock(nv).attach(RE)  # noqa: F821  (RE from 00-base.py; before 20-callbacks.py)
