"""Live callbacks: resonant slices, progress, and routing documents to them."""

from nvmri_bluesky.callbacks.progress import Progress
from nvmri_bluesky.callbacks.slices import LiveSlices, quantities

__all__ = ["LiveSlices", "Progress", "quantities"]
