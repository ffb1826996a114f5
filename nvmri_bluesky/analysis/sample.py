"""One sample's runs -> its partial report (and figures); every sample's parts -> report.json."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from nvmri_bluesky.analysis.calibration import calibration_report
from nvmri_bluesky.analysis.evolution import evolution_report
from nvmri_bluesky.analysis.layers import layer_with_spins, layers_result
from nvmri_bluesky.analysis.spins import (
    adaptive_batches,
    class_rasters,
    fine_map,
    located,
    snr_gain_part,
    spin_psf_and_line,
    spins_result,
    vetted_by_evolution,
)
from nvmri_bluesky.reconstruct.report import quantity, resolution_report, spins_report
from nvmri_bluesky.reconstruct.runs import load_run


def instrument_time_part(cat: Any, sample: str, uids: dict[str, str]) -> dict[str, Any]:
    """``instrument_time_s`` of one sample: per run (from its stop document) and the sum, s.

    Runs whose stop document carries no ``instrument_time_s`` (taken without an
    :class:`~nvmri_bluesky.plans.accounting.InstrumentClock`) are None and left
    out of the sums.
    """
    runs: dict[str, float | None] = {}
    for measurement, uid in uids.items():
        stop = cat.run(uid).metadata.get("stop") or {}
        runs[f"{sample}/{measurement}"] = stop.get("instrument_time_s")
    total = float(sum(t for t in runs.values() if t is not None))
    return {"total": total, "samples": {sample: total}, "runs": runs}


def _merge_instrument_time(into: dict[str, Any], part: dict[str, Any]) -> None:
    into["total"] = into.get("total", 0.0) + part["total"]
    for key in ("samples", "runs"):
        into.setdefault(key, {}).update(part[key])


def _empty_report(location: str) -> dict[str, Any]:
    nan = quantity(float("nan"), float("nan"))
    return {"scenario": "", "catalog": str(location), "runs": {},
            "gradient_gauss_per_nm": nan, "field_gradient_gauss_per_nm": nan,
            "ramsey_fringe_period_nm": nan,
            "esr_slice_fwhm_nm": nan, "layers": [], "spins": [],
            "resolution_nm": {"lateral": nan, "vertical": nan},
            "instrument_time_s": {"total": 0.0, "samples": {}, "runs": {}},
            "sample_wall_s": {}}


def dark_line_report(line: Any, result: Any) -> dict[str, Any]:
    """The dark-spin line the spin rasters were fitted with: its centre from the tip-free
    spectrum (and the rasters' fitted shift), its T2* from the spectrum and from the
    rasters (the spectrum's as prior, :func:`~.reconstruct.spinmodel.width_prior`)."""
    return {"centre_hz": quantity(line.centre_hz, line.centre_sigma_hz),
            "shift_in_rasters_hz": result.line_shift_hz,
            "t2_star_s": {"spectrum": quantity(line.t2_star_s, line.t2_star_sigma_s),
                          "rasters": quantity(result.line.t2_star_s,
                                              result.line_t2_star_sigma_s)}}


def _sample_objects(cat: Any, sample: str, uids: dict[str, str], out: Path
                    ) -> dict[str, Any]:
    """Spins and layers of one sample, each kept only with its evidence above threshold."""
    from nvmri_bluesky import figures
    from nvmri_bluesky.reconstruct.evidence import DELTA_DEVIANCE_MIN
    from nvmri_bluesky.reconstruct.protocol import PRIOR_MIN_COUPLING_HZ

    part: dict[str, Any] = {"spins": [], "layers": []}
    layer = layer_line = found = None
    if "layer_raster" in uids:
        found = layers_result(cat, uids)
        layer_line = found["line"]
        figures.layer(found["deer"], out / f"fig3_layer_{sample}.png", found["image"])
        if found["image"].delta_deviance >= DELTA_DEVIANCE_MIN:
            layer = found["image"]
            part["layers"] = [{"sample": sample, **found["report"]}]
        else:
            part["rejected"] = [{"kind": "layer", **found["report"]}]
    line = layer_line
    if class_rasters(uids):
        spin_detuning, line = spin_psf_and_line(cat, uids)
    refuted = any(r["kind"] == "layer" for r in part.get("rejected", []))
    content, evolution = (evolution_report(cat, uids, line, layer_refuted=refuted)
                          if "deer_evolution" in uids else (None, {}))
    part.update(evolution)
    if class_rasters(uids):
        result, rasters, spins = spins_result(cat, uids, layer=layer, content=content,
                                              layer_detuning=found["detuning"] if found else None)
        entries = spins_report(replace(result, spins=tuple(spins)))
        part["dark_line"] = dark_line_report(line, result)
        # below the prior's coupling by more than 3 sigma (a true 50 kHz spin is kept)
        weak = [abs(s.coupling_hz) + 3 * s.coupling_sigma_hz < PRIOR_MIN_COUPLING_HZ
                for s in spins]
        part.setdefault("rejected", []).extend(
            {"kind": "spin", "why": f"coupling more than 3 sigma below the searched prior's "
             f"{PRIOR_MIN_COUPLING_HZ / 1e3:g} kHz (e.g. a layer spin near the NV)", **e}
            for e, w in zip(entries, weak, strict=True) if located(e) and w)
        candidates = [i for i, (e, w) in enumerate(zip(entries, weak, strict=True))
                      if located(e) and not w]
        decay_height = (layer.height_nm if layer is not None
                        else content.layer_height_nm if content is not None and content.layer
                        else None)
        kept, contradicted = vetted_by_evolution(cat, uids, [spins[i] for i in candidates],
                                                  [entries[i] for i in candidates], line,
                                                  decay_height)
        part["spins"] = [{"sample": sample, **e} for _, e in kept]
        part["rejected"].extend(contradicted)
        located_hz = [s.coupling_hz for s, _ in kept]
        dropped = [spins[i] for i in candidates if not any(spins[i] is s for s, _ in kept)]
        result = replace(result, spins=tuple(s for s in result.spins
                                             if not any(s is d for d in dropped)))
        if layer is not None and located_hz:       # the joint decay model: layer + spins
            part["layers"] = [{"sample": sample,
                               **layer_with_spins(cat, uids, found, located_hz)}]
        if layer is not None and part["layers"]:
            # the joint spin fit's layer scale: the layer's density as the spin rasters see it
            scale, scale_sigma = result.layer_scale
            part["layers"][0]["density_in_spin_rasters_per_nm2"] = quantity(
                scale * layer.density_per_nm2, scale_sigma * layer.density_per_nm2)
        part.setdefault("rejected", []).extend(
            {"kind": "spin", "why": "an offset ended on the search box's bound: an object "
             "outside the searched volume (e.g. a layer spin), not a located spin", **e}
            for e in entries if not located(e))
        if result.spins:
            part["resolution_nm"] = resolution_report(result)
            part.update(snr_gain_part(cat, uids))
        if adaptive_batches(uids) and len(rasters) > 1:      # where the adaptive points went
            figures.adaptive_points(rasters[0], rasters[-1], result, spin_detuning, line,
                                    out / f"fig4_adaptive_{sample}.png")
        zoom = load_run(cat, uids["deer_zoom"], ["deer_raster"]) if "deer_zoom" in uids else None
        figures.spins(rasters[0], result, out / f"fig4_spins_{sample}.png", zoom=zoom,
                      fine=fine_map(result, rasters, spin_detuning, result.line))
    return part


def analyse_sample(cat: Any, sample: str, uids: dict[str, str], out: Path) -> dict[str, Any]:
    """Reconstruct one sample's runs: the report.json entries it gives (and its figures).

    Every kind of run is reconstructed independently of the others (calibration
    lines, layer runs, spin rasters of each coupling class); a spin or a layer
    is reported only with its evidence (:mod:`~nvmri_bluesky.reconstruct.evidence`),
    and the sample's ``detection_limit_hz`` comes from its tip-free evolution.

    Parameters
    ----------
    cat
        The open catalog.
    sample : str
        The sample's name.
    uids : dict
        measurement -> run uid, as the protocol plans return them.
    out : Path
        Where figures go.

    Returns
    -------
    dict
        A partial report (only the keys this sample measures); :func:`merge`
        combines them.
    """
    from nvmri_bluesky import figures

    part: dict[str, Any] = {"runs": {f"{sample}/{m}": u for m, u in uids.items()},
                            "instrument_time_s": instrument_time_part(cat, sample, uids)}
    if "ramsey_line" in uids:
        part.update(calibration_report(cat, uids))
        figures.calibration(cat, uids, out / "fig2_calibration.png")
    if "deer_evolution" in uids or "layer_raster" in uids:
        objects = _sample_objects(cat, sample, uids, out)
        limit = objects.pop("detection_limit_hz", None)
        extra = {k: objects.pop(k) for k in ("evolution", "dark_line", "rejected")
                 if k in objects}
        part.update(objects)
        part["samples"] = {sample: {"detection_limit_hz": limit, **extra}}
        part["detection_limit_hz"] = limit      # per sample in "samples"
    return part


def merge(parts: dict[str, dict[str, Any]], location: str) -> dict[str, Any]:
    """report.json's content from every sample's partial report (sample -> part)."""
    report = _empty_report(location)
    report["scenario"] = ", ".join(parts)
    for part in parts.values():
        for key, value in part.items():
            if key in ("runs", "sample_wall_s"):
                report[key].update(value)
            elif key == "instrument_time_s":
                _merge_instrument_time(report[key], value)
            elif key in ("layers", "spins"):
                report[key] += value
            elif key == "samples":
                report.setdefault(key, {}).update(value)
            else:
                report[key] = value
    return report


def analyse(cat: Any, runs: dict[str, dict[str, str]], out: Path, location: str
            ) -> dict[str, Any]:
    """Reconstruct every sample's runs; return report.json's content (and draw figures).

    Parameters
    ----------
    cat
        The open catalog.
    runs : dict
        sample name -> {measurement: uid}.
    out : Path
        Where figures go.
    location : str
        The catalog's directory or URI (recorded).
    """
    return merge({sample: analyse_sample(cat, sample, uids, out)
                  for sample, uids in runs.items()}, location)
