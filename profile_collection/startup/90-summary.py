# Say what is available.
from nvmri_bluesky.profile import summary

print(summary(nv, callbacks))  # noqa: F821
