# Live slices and progress (interactive sessions), the catalog, and 0MQ publishing.
from nvmri_bluesky.profile import subscribe_callbacks

callbacks = subscribe_callbacks(RE)  # noqa: F821  (RE from 00-base.py)
