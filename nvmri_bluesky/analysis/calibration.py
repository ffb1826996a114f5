"""Fig. 2 from the calibration runs: tip gradient, Ramsey fringe period, CW slice width."""

from __future__ import annotations

from typing import Any

import numpy as np

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct.fig2 import (
    cw_slice_fwhm,
    field_gradient_map,
    ramsey_local_periods,
)
from nvmri_bluesky.reconstruct.report import gradient_report, ramsey_report, slice_report
from nvmri_bluesky.reconstruct.runs import load_run


def calibration_report(cat: Any, uids: dict[str, str]) -> dict[str, Any]:
    """Fig. 2 quantities from the calibration runs in ``uids`` (each from the runs it needs).

    ``gradient_gauss_per_nm`` is the paper's quantity: the gradient the shortest
    Ramsey fringe period implies through the linear Zeeman shift,
    1 / (gamma_e tau period).  ``field_gradient_gauss_per_nm`` is the exact
    gradient of the field along the NV axis on the same line, from both NV
    transitions (physics.field_from_transitions); near 0.12 T, just above the
    level anticrossing, it is larger (physics.md: 2.84 against 2.4 G/nm).
    A quantity whose run is not in ``uids`` (e.g. the CW slice, when the Ramsey
    line is reconstructed on its own) is left out.
    """
    out: dict[str, Any] = {}
    if "ramsey_line" in uids:
        ramsey = load_run(cat, uids["ramsey_line"], ["ramsey_raster"])
        p0 = np.ravel(physics.normalised_population(
            ramsey["ramsey"].values, ramsey["bright"].values, ramsey["dark"].values))
        fringes = ramsey_report(ramsey_local_periods(ramsey["y"].values, p0),
                                float(ramsey.attrs["tau_s"]))
        out["gradient_gauss_per_nm"] = fringes["gradient_gauss_per_nm"]
        out["ramsey_fringe_period_nm"] = fringes["ramsey_fringe_period_nm"]
    if "gradient_line" in uids:
        line = load_run(cat, uids["gradient_line"], ["psf_map"])
        out["field_gradient_gauss_per_nm"] = gradient_report(
            field_gradient_map(line, along="y")["dbpar"].values)
    if "cw_slice" in uids:
        cw = load_run(cat, uids["cw_slice"], ["esr_raster"])
        fit = cw_slice_fwhm(cw["x"].values, np.ravel(cw["cw_0"].values),
                            reference=np.ravel(cw["cw_1"].values))
        out["esr_slice_fwhm_nm"] = slice_report(fit)
    return out
