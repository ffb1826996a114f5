"""A dark-spin layer from its runs: height from its image, density from its tip-free decay."""

from __future__ import annotations

from typing import Any

from nvmri_bluesky.analysis.spins import psf_and_line
from nvmri_bluesky.reconstruct.report import layer_report
from nvmri_bluesky.reconstruct.runs import load_run


def layers_result(cat: Any, uids: dict[str, str]) -> dict[str, Any]:
    """Height (image) and density (tip-free decay) of a layer from its runs."""
    from nvmri_bluesky.reconstruct.layer_fits import fit_layer_decay, fit_layer_image

    detuning, line = psf_and_line(cat, uids, "layer_psf_map", "layer_spectrum", model="bath")
    deer = load_run(cat, uids["layer_raster"], ["deer_raster"])
    image = fit_layer_image(deer, detuning, line)
    decay = fit_layer_decay(load_run(cat, uids["layer_decay"], ["deer_evolution"]),
                            image.height_nm, image.height_sigma_nm, line=line)
    return {"report": layer_report(image, decay), "deer": deer, "image": image,
            "decay": decay, "line": line, "detuning": detuning}


def layer_with_spins(cat: Any, uids: dict[str, str], found: dict[str, Any],
                     couplings_hz: list[float]) -> dict[str, Any]:
    """The layer's report from the joint decay model: layer and the located point spins.

    The tip-free decay flips every spin on the line, the point spins too: their
    oscillations (couplings from the spin fit) enter the decay's model as known
    factors, so they are not read as layer density.
    """
    from nvmri_bluesky.reconstruct.layer_fits import fit_layer_decay

    image = found["image"]
    decay = fit_layer_decay(load_run(cat, uids["layer_decay"], ["deer_evolution"]),
                            image.height_nm, image.height_sigma_nm, line=found["line"],
                            spin_couplings_hz=couplings_hz)
    return layer_report(image, decay)
