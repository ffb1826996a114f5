"""``python -m nvmri_bluesky.testing {regenerate,up}`` (:func:`.deployment.main`)."""

import sys

from nvmri_bluesky.testing.deployment import main

sys.exit(main())
