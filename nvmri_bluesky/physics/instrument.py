"""The defaults of ``physics.md`` (sensor, tip, dark-spin bath) as one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from nvmri_bluesky.physics.constants import TAU_CW_S, Z_MIN_NM
from nvmri_bluesky.physics.geometry import axis_from_angles, tip_field
from nvmri_bluesky.physics.resonances import dark_spin_frequency, nv_frequency

__all__ = [
    "Instrument",
]


@dataclass(frozen=True)
class Instrument:
    """Defaults of ``physics.md``: the sensor, the tip and the dark-spin bath.

    Every attribute is in the unit its name gives.  Scenario files override
    these; the simulator and the analysis both start from them.
    """

    b0_tesla: float = 0.12
    nv_depth_nm: float = 10.0
    nv_axis_deg: tuple[float, float] = (54.74, 0.0)
    nv_t2_star_s: float = 2e-6
    nv_t2_s: float = 20e-6
    nv_t2_exponent: float = 1.5
    photons_per_shot: float = 0.03
    contrast: float = 0.30
    tau_cw_s: float = TAU_CW_S
    contrast_cw: float = 0.15
    cw_count_rate_hz: float = 100e3
    tip_radius_nm: float = 30.0
    tip_moment_am2: float = 4.3e-17
    dark_t2_star_s: float = 150e-9
    rf_pi_s: float = 100e-9
    z_min_nm: float = Z_MIN_NM
    nv_axis: NDArray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nv_axis", axis_from_angles(*self.nv_axis_deg))

    @property
    def nv_position_nm(self) -> NDArray:
        """NV position in the lab frame, shape (3,), nm."""
        return np.array([0.0, 0.0, -self.nv_depth_nm])

    @property
    def b0_vector(self) -> NDArray:
        """Bias field along the NV axis, shape (3,), T."""
        return self.b0_tesla * self.nv_axis

    def field_at(self, points_nm: ArrayLike, apex_nm: ArrayLike) -> NDArray:
        """Total field (bias + tip) at ``points_nm`` with the apex at ``apex_nm``, T."""
        return self.b0_vector + tip_field(points_nm, apex_nm, self.tip_radius_nm,
                                          self.tip_moment_am2)

    def f_nv(self, apex_nm: ArrayLike) -> NDArray:
        """NV ms=0 -> +1 frequency with the apex at ``apex_nm`` (..., 3), Hz."""
        return nv_frequency(self.field_at(self.nv_position_nm, apex_nm), self.nv_axis)

    @property
    def f_nv0(self) -> float:
        """NV ms=0 -> +1 frequency with the tip far away, Hz."""
        return float(nv_frequency(self.b0_vector, self.nv_axis))

    @property
    def f_dark0(self) -> float:
        """Dark-spin resonance with the tip far away, Hz."""
        return float(dark_spin_frequency(self.b0_vector))
