"""Point spins from a sample's DEER rasters: one joint fit per coupling class, merged,
each vetted by the tip-free evolution."""

from __future__ import annotations

from typing import Any

import numpy as np

from nvmri_bluesky.analysis.evolution import evolution_data
from nvmri_bluesky.reconstruct.report import snr_gain_report
from nvmri_bluesky.reconstruct.runs import load_run

SPIN_RASTERS = ("deer_raster", "deer_survey_more2", "deer_survey_more", "deer_survey",
                "deer_zoom")
"""Measurement names of the spin rasters of coupling class 1 (class k > 1: ``name_k``);
``deer_survey_more``, ``deer_survey_more2``: the adaptive protocol's survey repeated with
more shots (``plans.adaptive``), the fullest first."""


def psf_and_line(cat: Any, uids: dict[str, str], psf_name: str = "psf_map",
                  spectrum_name: str = "deer_spectrum", model: str = "single"
                  ) -> tuple[Any, Any]:
    """The PSF map's Delta f_dark interpolant (with its sigma) and the dark-spin line
    fitted to the spectrum (``model``: "single" or "bath")."""
    from nvmri_bluesky.reconstruct.detuning import (
        DetuningInterpolant,
        dark_detuning_map,
        dark_detuning_sigma,
    )
    from nvmri_bluesky.reconstruct.lines import fit_deer_spectrum

    psf = load_run(cat, uids[psf_name], ["psf_map"])
    detuning = DetuningInterpolant.from_map(dark_detuning_map(psf), dark_detuning_sigma(psf))
    _, line = fit_deer_spectrum(load_run(cat, uids[spectrum_name], ["deer_spectrum"]),
                                model=model)
    return detuning, line


def spin_psf_and_line(cat: Any, uids: dict[str, str]) -> tuple[Any, Any]:
    """The spin rasters' PSF map and dark-spin line (a layer's spectrum when no own one)."""
    if "deer_spectrum" not in uids and "layer_spectrum" in uids:
        return psf_and_line(cat, uids, spectrum_name="layer_spectrum", model="bath")
    return psf_and_line(cat, uids)


def class_rasters(uids: dict[str, str]) -> list[list[str]]:
    """Spin raster names per coupling class (fine raster first: it seeds the fit)."""
    classes = []
    for k in range(1, 10):
        names = [m if k == 1 else f"{m}_{k}" for m in SPIN_RASTERS]
        present = [m for m in names if m in uids]
        if present:
            classes.append(present)
    return classes


def adaptive_batches(uids: dict[str, str]) -> list[str]:
    """Measurement names of the adaptive protocol's point batches (``deer_adaptive_1`` ...),
    in order (``plans.adaptive``)."""
    names = [m for m in uids if m.startswith("deer_adaptive_") and m[14:].isdigit()]
    return sorted(names, key=lambda m: int(m[14:]))


def _merge_spins(results: list[Any]) -> list[Any]:
    """Spins of every class's fit; one found in several classes (closer than
    ``reconstruct.protocol.SAME_SPIN_NM``) kept where it is best known."""
    from nvmri_bluesky.reconstruct.protocol import SAME_SPIN_NM

    spins = sorted((s for r in results for s in r.spins),
                   key=lambda s: float(np.linalg.norm(s.offset_sigma_nm)))
    kept: list[Any] = []
    for s in spins:
        if all(np.linalg.norm(s.offset_nm - k.offset_nm) >= SAME_SPIN_NM for k in kept):
            kept.append(s)
    return sorted(kept, key=lambda s: -abs(s.coupling_hz))


def spins_result(cat: Any, uids: dict[str, str], layer: Any = None,
                 content: Any = None, layer_detuning: Any = None
                 ) -> tuple[Any, Any, list[Any]]:
    """Localisation of point spins: one joint fit per coupling class, merged.

    Parameters
    ----------
    cat
        The open catalog.
    uids : dict
        measurement -> uid.
    layer : LayerFit, optional
        A layer found on the same NV: its expected image is a known background
        of the spin fit (the joint model: the layer's contrast does not bias
        the spins).
    content : EvolutionContent, optional
        The tip-free evolution's model choice (its coupling, for one spin).
    layer_detuning : DetuningInterpolant, optional
        The layer's PSF map: the layer's image where the spin map does not reach.

    Returns
    -------
    (LocalizationResult of class 1, its rasters (fine first), merged list of SpinFit)
    """
    from nvmri_bluesky.reconstruct.localize import CouplingFit, fit_deer_evolution, localize_spins
    from nvmri_bluesky.reconstruct.spinmodel import with_layer_background

    detuning, line = spin_psf_and_line(cat, uids)
    coupling = None               # several or no couplings seen: from w and the geometry
    if content is None:
        coupling = fit_deer_evolution(load_run(cat, uids["deer_evolution"], ["deer_evolution"]))
    elif len(content.couplings_hz) == 1:
        coupling = CouplingFit(content.couplings_hz[0], content.coupling_sigmas_hz[0],
                               content.amplitudes[0], 0.0, float("nan"))
    results, first_class = [], []
    for k, names in enumerate(class_rasters(uids)):
        deer = [load_run(cat, uids[m], ["deer_raster"]) for m in names]
        if k == 0 and adaptive_batches(uids):      # the adaptive protocol's points
            from nvmri_bluesky.reconstruct.adaptive import concat_points

            deer.append(concat_points([load_run(cat, uids[m], ["deer_points"])
                                       for m in adaptive_batches(uids)]))
        if layer is not None:
            deer = [with_layer_background(d, detuning, line, layer, fallback=layer_detuning)
                    for d in deer]
        single = len(class_rasters(uids)) == 1
        results.append(localize_spins(deer, detuning, line,
                                      coupling_hint=coupling if single else None))
        first_class = deer if k == 0 else first_class
    return results[0], first_class, _merge_spins(results)


def snr_gain_part(cat: Any, uids: dict[str, str]) -> dict[str, Any]:
    """Fig. 4a: the single spin's quantum SNR gain from its tip-free DEER evolution."""
    from nvmri_bluesky.reconstruct.localize import fit_deer_evolution

    evolution = load_run(cat, uids["deer_evolution"], ["deer_evolution"])
    coupling = fit_deer_evolution(evolution)
    return snr_gain_report(evolution, coupling.nu_hz, coupling.nu_sigma_hz)


def located(spin: dict[str, Any]) -> bool:
    """Every offset of a ``spins`` entry determined."""
    return all(spin[a]["value"] is not None for a in ("dx_nm", "dy_nm", "dz_nm"))


def fine_map(result: Any, rasters: list[Any], detuning: Any, line: Any) -> Any:
    """Fig. 4's fine-voxel density around the strongest spin from all the class's rasters
    (``density.fine_density``; None without a spin)."""
    from nvmri_bluesky.reconstruct.density import fine_density

    if not result.spins:
        return None
    return fine_density(rasters, detuning, line, result.spins[0].offset_nm,
                        spins=[[*s.offset_nm, s.weight] for s in result.spins],
                        shift_hz=result.line_shift_hz, layer_scale=result.layer_scale[0])


def vetted_by_evolution(cat: Any, uids: dict[str, str], spins: list[Any],
                         entries: list[dict[str, Any]], line: Any, layer_height_nm: float | None
                         ) -> tuple[list[tuple[Any, dict[str, Any]]], list[dict[str, Any]]]:
    """Located spins the tip-free evolution allows, (SpinFit, entry) with their evidence from
    both; the rest as ``rejected`` entries.

    ``evidence.value`` becomes the rasters' 2 Delta log L plus the evolution's
    (``crosscheck.spins_the_evolution_allows``), with both parts; without an
    evolution run the rasters' alone.  ``layer_height_nm``: the decay of a
    layer on the same NV (the imaged one, else the evolution's own) enters the
    evolution's models.
    """
    from nvmri_bluesky.reconstruct.crosscheck import spins_the_evolution_allows
    from nvmri_bluesky.reconstruct.localize import MIN_DELTA_DEVIANCE

    if "deer_evolution" not in uids or not spins:
        return list(zip(spins, entries, strict=True)), []
    support, keep = spins_the_evolution_allows(
        evolution_data(cat, uids),
        tuple(s.coupling_hz for s in spins), tuple(s.delta_deviance for s in spins),
        float(line.peak), layer_height_nm, MIN_DELTA_DEVIANCE)
    kept, rejected = [], []
    for s, e, s_k, k in zip(spins, entries, support, keep, strict=True):
        ev = {**e["evidence"], "value": s.delta_deviance + s_k, "rasters": s.delta_deviance,
              "evolution": s_k}
        if k:
            kept.append((s, {**e, "evidence": ev}))
        else:
            rejected.append({"kind": "spin", **e, "evidence": ev, "why": (
                f"the tip-free evolution contradicts its {s.coupling_hz / 1e3:.0f} kHz coupling "
                f"(2 delta log L {s_k:.0f} there, {s.delta_deviance:.0f} in the rasters: "
                f"{s.delta_deviance + s_k:.0f} < {MIN_DELTA_DEVIANCE:g})")})
    return kept, rejected
