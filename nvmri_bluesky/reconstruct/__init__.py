"""Reconstruction: measured maps -> PSF -> deconvolution -> spins, layers, resolution.

Pure, vectorised functions on numpy arrays and xarray Datasets (coordinates
in nm); the physics comes from :mod:`nvmri_bluesky.physics`, the PSF from
measured maps only (no tip model).  Input datasets and the measurement
protocol they assume: ``docs/reconstruction.md``.
"""

from nvmri_bluesky.reconstruct.counts import contrast_with_sigma, deer_contrast_dataset
from nvmri_bluesky.reconstruct.deconvolve import (
    RichardsonLucyResult,
    ShiftOperator,
    estimate_noise,
    richardson_lucy_operator,
)
from nvmri_bluesky.reconstruct.deconvolve_fft import richardson_lucy, richardson_lucy_discrepancy
from nvmri_bluesky.reconstruct.density import deconvolve_deer
from nvmri_bluesky.reconstruct.detuning import DetuningInterpolant, dark_detuning_map
from nvmri_bluesky.reconstruct.fig2 import (
    LocalPeriods,
    SliceFit,
    cw_slice_fwhm,
    field_gradient_map,
    fringe_gradient,
    ramsey_local_periods,
    shortest_fringe_period,
)
from nvmri_bluesky.reconstruct.layer_fits import LayerFit, fit_layer_decay, fit_layer_image
from nvmri_bluesky.reconstruct.layers import (
    layer_contrast,
    layer_decay,
    layer_decay_integral,
    layer_integral,
)
from nvmri_bluesky.reconstruct.lines import (
    FlipLine,
    LorentzianFit,
    fit_deer_spectrum,
    fit_flip_line,
    fit_lorentzian,
)
from nvmri_bluesky.reconstruct.localize import (
    PRIOR_BOX,
    CouplingFit,
    LocalizationResult,
    SpinFit,
    fit_deer_evolution,
    localize_spins,
)
from nvmri_bluesky.reconstruct.psf import DarkSpinPSF, feasible_offset_box
from nvmri_bluesky.reconstruct.spinmodel import fisher_information

__all__ = [
    "contrast_with_sigma", "deer_contrast_dataset",
    "RichardsonLucyResult", "ShiftOperator", "estimate_noise", "richardson_lucy",
    "richardson_lucy_discrepancy", "richardson_lucy_operator",
    "LocalPeriods", "SliceFit", "cw_slice_fwhm", "field_gradient_map", "fringe_gradient",
    "ramsey_local_periods", "shortest_fringe_period",
    "LayerFit", "fit_layer_decay", "fit_layer_image", "layer_contrast", "layer_decay",
    "layer_decay_integral", "layer_integral",
    "PRIOR_BOX", "CouplingFit", "LocalizationResult", "SpinFit", "deconvolve_deer",
    "fisher_information", "fit_deer_evolution", "localize_spins",
    "DarkSpinPSF", "DetuningInterpolant", "FlipLine", "LorentzianFit", "dark_detuning_map",
    "feasible_offset_box", "fit_deer_spectrum", "fit_flip_line", "fit_lorentzian",
]
