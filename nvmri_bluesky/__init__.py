"""nvmri_bluesky: nanoscale MRI with a single NV centre, run the Bluesky way."""

__version__ = "0.1.0"
