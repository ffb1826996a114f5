"""Pieces of the sample analysis that need no catalog: raster classes and merged spins."""

from __future__ import annotations

import numpy as np

from nvmri_bluesky.analysis.spins import _merge_spins, class_rasters, located
from nvmri_bluesky.reconstruct.localize import SpinFit


def _spin(offset, sigma, coupling_hz) -> SpinFit:
    return SpinFit(offset_nm=np.asarray(offset, float), offset_sigma_nm=np.full(3, sigma),
                   weight=1.0, weight_sigma=0.1, coupling_hz=coupling_hz,
                   coupling_sigma_hz=1e3, coupling_geometric_hz=coupling_hz,
                   coupling_branches_hz=np.array([coupling_hz]))


class _Result:
    def __init__(self, spins):
        self.spins = tuple(spins)


def test_class_rasters_fine_first_per_coupling_class() -> None:
    uids = {"psf_map": "a", "deer_survey": "b", "deer_raster": "c", "deer_survey_2": "d",
            "layer_raster": "e"}
    assert class_rasters(uids) == [["deer_raster", "deer_survey"], ["deer_survey_2"]]
    assert class_rasters({"layer_raster": "e"}) == []


def test_a_spin_found_in_two_classes_is_reported_once_where_best_known() -> None:
    strong = _spin([1.0, 1.0, -3.0], 0.05, 800e3)
    strong_again = _spin([1.2, 0.9, -3.1], 0.2, 790e3)           # seen by the long-tau survey
    weak = _spin([6.0, 6.0, -2.0], 0.1, 80e3)
    merged = _merge_spins([_Result([strong]), _Result([strong_again, weak])])
    assert [s.coupling_hz for s in merged] == [800e3, 80e3]
    assert merged[0] is strong


def test_a_spin_with_an_undetermined_offset_is_not_located() -> None:
    ok = {a: {"value": 1.0, "sigma": 0.1} for a in ("dx_nm", "dy_nm", "dz_nm")}
    assert located(ok)
    assert not located({**ok, "dz_nm": {"value": None, "sigma": None, "why": "bound"}})
