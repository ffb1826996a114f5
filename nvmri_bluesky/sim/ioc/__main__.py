"""``python -m nvmri_bluesky.sim.ioc``: serve the simulated instrument."""

import sys

from nvmri_bluesky.sim.ioc.server import main

sys.exit(main())
