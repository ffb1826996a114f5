"""NV-MRI physics: the one owner of every formula in ``reference/physics.md``.

The simulated IOC and the reconstruction both import this module; nothing else
in the package writes a physics formula.  Every function is pure and
vectorised: array arguments broadcast against each other with numpy's rules.

Units (as in the documents): lengths in nm, fields in tesla, frequencies in
Hz, times in s, magnetic moments in A m^2.

Frame: the diamond surface is z = 0, diamond below (z < 0), the NV at
(0, 0, -depth).  Tip coordinates are those of the apex; the tip is a uniformly
magnetised sphere whose centre sits ``radius`` above the apex.

The formulas live in one module per concern, all re-exported here (use
``physics.X``):

- :mod:`~.constants`: physical constants and the simulated instrument's model
  constants (``MW_RABI_HZ``, ``TAU_CW_S``, ...);
- :mod:`~.instrument`: :class:`Instrument`, the defaults of ``physics.md``;
- :mod:`~.geometry`: the tip's field and gradient, axes, apex drift;
- :mod:`~.resonances`: NV and dark-spin resonance frequencies and their
  inversions;
- :mod:`~.sequences`: CW ODMR, Rabi, Ramsey, echo, DEER signals and readout;
- :mod:`~.imaging`: slice width, point-spread function, couplings, SNR gain.
"""

from nvmri_bluesky.physics.constants import (
    D_ZFS,
    DIPOLAR_HZ_NM3,
    GAMMA_E,
    MU0_OVER_4PI,
    MW_RABI_HZ,
    MW_REF_POWER_DBM,
    TAU_CW_S,
    Z_MIN_NM,
)
from nvmri_bluesky.physics.geometry import (
    apex_with_drift,
    axis_from_angles,
    tip_field,
    tip_gradient,
)
from nvmri_bluesky.physics.imaging import (
    classical_deer_factor,
    couplings_from_weight,
    dark_spin_psf,
    gradient_from_spatial_width,
    quantum_snr_gain,
    rms_coupling,
    spatial_width,
)
from nvmri_bluesky.physics.instrument import (
    Instrument,
)
from nvmri_bluesky.physics.resonances import (
    dark_spin_frequency,
    dark_spin_frequency_from_transitions,
    field_from_transitions,
    minus_transition_signs,
    nv_frequency,
    nv_transition_frequencies,
)
from nvmri_bluesky.physics.sequences import (
    cw_counts,
    dark_flip_probability,
    deer_coherence,
    deer_contrast,
    deer_weight,
    dipolar_coupling,
    echo_coherence,
    expected_counts,
    lorentzian,
    normalised_population,
    odmr_fluorescence,
    odmr_pair_offset,
    p0_from_coherence,
    rabi_amplitude,
    rabi_flip_probability,
    rabi_from_power,
    ramsey_p0,
)

__all__ = [
    "MW_RABI_HZ", "MW_REF_POWER_DBM", "TAU_CW_S", "GAMMA_E", "D_ZFS", "DIPOLAR_HZ_NM3",
    "Z_MIN_NM", "Instrument", "axis_from_angles", "tip_field", "tip_gradient",
    "nv_transition_frequencies", "nv_frequency", "dark_spin_frequency",
    "field_from_transitions", "lorentzian", "odmr_fluorescence", "rabi_flip_probability",
    "dark_flip_probability", "ramsey_p0", "echo_coherence", "dipolar_coupling",
    "deer_coherence", "deer_weight", "p0_from_coherence", "expected_counts", "spatial_width",
    "dark_spin_psf", "rabi_amplitude", "rabi_from_power", "cw_counts", "apex_with_drift",
    "dark_spin_frequency_from_transitions", "couplings_from_weight",
    "gradient_from_spatial_width", "classical_deer_factor", "quantum_snr_gain", "rms_coupling",
    "minus_transition_signs", "MU0_OVER_4PI", "normalised_population", "deer_contrast",
    "odmr_pair_offset",
]
