# Plans with the instrument bound: RE(deer_raster(x=(-10, 10, 21), y=..., z=20, ...)).
from nvmri_bluesky.profile import bound_plans

globals().update(bound_plans(nv))  # noqa: F821  (nv from 10-devices.py)
