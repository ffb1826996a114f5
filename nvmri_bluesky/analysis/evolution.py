"""The tip-free DEER evolution: its model choice and the sample's detection limit."""

from __future__ import annotations

from typing import Any

import numpy as np

from nvmri_bluesky.reconstruct.runs import load_run


def evolution_data(cat: Any, uids: dict[str, str]) -> Any:
    """The sample's tip-free evolution; with the protocol's repeat, the counts added (as the
    protocol read them, ``crosscheck.combine_evolutions``)."""
    from nvmri_bluesky.reconstruct.crosscheck import combine_evolutions

    ds = load_run(cat, uids["deer_evolution"], ["deer_evolution"])
    if "deer_evolution_2" in uids:
        ds = combine_evolutions([ds, load_run(cat, uids["deer_evolution_2"], ["deer_evolution"])])
    return ds


def evolution_report(cat: Any, uids: dict[str, str], line: Any = None,
                     layer_refuted: bool = False) -> tuple[Any, dict[str, Any]]:
    """The tip-free evolution's model choice and the sample's detection limit.

    With ``layer_refuted`` (the layer's own image refuted it) the evolution is
    read again without a layer, as the protocol did (``without_refuted_layer``).

    Returns
    -------
    (EvolutionContent, dict)
        The content, and ``{"detection_limit_hz", "evolution"}`` for the report.
    """
    from nvmri_bluesky.reconstruct.crosscheck import NOMINAL_FLIP_PROBABILITY, detection_limit_hz
    from nvmri_bluesky.reconstruct.evidence import (
        DELTA_DEVIANCE_MIN,
        classify_evolution,
        without_refuted_layer,
    )

    ds = evolution_data(cat, uids)
    content = classify_evolution(ds)
    if layer_refuted:
        content = without_refuted_layer(ds, content)
    p = float(line.peak) if line is not None else NOMINAL_FLIP_PROBABILITY
    limit = detection_limit_hz(ds, flip_probability=p)
    return content, {
        "detection_limit_hz": limit if np.isfinite(limit) else None,
        "evolution": {"couplings_hz": list(content.couplings_hz),
                      "spin_evidence": list(content.spin_evidence),
                      "layer": content.layer, "layer_evidence": content.layer_evidence,
                      "threshold": DELTA_DEVIANCE_MIN,
                      "models": [list(m) for m in content.deviance_trail]}}
