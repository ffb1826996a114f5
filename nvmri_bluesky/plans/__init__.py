"""Bluesky plans for NV-MRI: pulse programs, frequency lock, DEER points and rasters.

Plans take the instrument (as built by :func:`nvmri_bluesky.devices.make_devices`)
as their first argument.  Imported lazily: ``import nvmri_bluesky.plans`` does
not import ophyd and bluesky until a plan is used.  (The pulse-program format,
the contract between the pulser and the instrument, is
:mod:`nvmri_bluesky.pulses`, below both plans and the simulator.)
"""

from importlib import import_module

_WHERE = {
    "odmr_sweep": "sweeps", "rabi": "sweeps", "ramsey": "sweeps", "echo": "sweeps",
    "deer_spectrum": "sweeps", "deer_evolution": "sweeps", "retract": "stubs",
    "deer_point": "deer",
    "deer_raster": "rasters", "psf_map": "rasters", "ramsey_raster": "rasters",
    "esr_raster": "rasters",
    "set_z_min": "service", "set_source_power": "service",
    "FrequencyLock": "lock", "locked_acquire": "lock",
    "deer_points": "adaptive", "adaptive_spin": "adaptive",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
