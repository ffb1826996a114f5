# Live slices and progress (interactive sessions), the catalog, and 0MQ publishing;
# suspend while the laser is in fault (the points of the fault are taken again).
from nvmri_bluesky.profile import subscribe_callbacks
from nvmri_bluesky.run_engine import install_suspenders

callbacks = subscribe_callbacks(RE)  # noqa: F821  (RE from 00-base.py)
install_suspenders(RE, health,  # noqa: F821  (health from 10-devices.py)
                   notify=callbacks["progress"].note if "progress" in callbacks else None)
