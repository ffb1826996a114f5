# NV-MRI instrument profile: the RunEngine.  Thin by design: everything is imported
# from nvmri_bluesky.  Environment: see docs/deployment.md.
import os

import bluesky.plan_stubs as bps  # noqa: F401  (for the session)
import bluesky.plans as bp  # noqa: F401

import nvmri_bluesky
from nvmri_bluesky.run_engine import RunEngine  # stop documents that say why a run ended
from nvmri_bluesky.threads import one_blas_thread

one_blas_thread()  # small fits: BLAS threads only spin (nvmri_bluesky/threads.py)

RE = RunEngine({})
RE.md["instrument"] = "nvmri"
RE.md["nvmri_version"] = nvmri_bluesky.__version__
if os.environ.get("NVMRI_SCENARIO"):
    RE.md["scenario"] = os.environ["NVMRI_SCENARIO"]

# A refused plan prints one line in IPython; the traceback is behind %tb.
from nvmri_bluesky.profile import short_errors  # noqa: E402

short_errors()
