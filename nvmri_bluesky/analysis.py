"""From stored runs to report.json: the reconstruction of a whole protocol.

Reads runs from the catalog only (:func:`nvmri_bluesky.reconstruct.runs.load_run`),
never the simulator: each sample's ``{measurement: uid}`` map says which run
is which.  Figures are written beside the report.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from nvmri_bluesky import physics
from nvmri_bluesky.reconstruct.fig2 import (
    cw_slice_fwhm,
    field_gradient_map,
    ramsey_local_periods,
)
from nvmri_bluesky.reconstruct.report import (
    gradient_report,
    layer_report,
    quantity,
    ramsey_report,
    resolution_report,
    slice_report,
    snr_gain_report,
    spins_report,
)
from nvmri_bluesky.reconstruct.runs import load_run

PAPER = {
    "gradient_gauss_per_nm": (2.4, 0.2, "G/nm"),
    "ramsey_fringe_period_nm": (0.33, 0.03, "nm"),
    "esr_slice_fwhm_nm": (0.25, None, "nm"),
    "layer height nv1": (10.0, None, "nm"),
    "layer height nv2": (14.0, None, "nm"),
    "layer density": (0.5, None, "/nm^2"),
    "layer coupling": (100.0, None, "kHz"),
    "spin dx": (4.0, 0.4, "nm"), "spin dy": (5.1, 0.3, "nm"), "spin dz": (-3.65, 0.05, "nm"),
    "snr gain": (1.9, None, ""),
    "resolution lateral": (0.8, 0.4, "nm"), "resolution vertical": (1.5, 0.6, "nm"),
}
"""The paper's values (Figs. 2-4) the table compares with: (value, sigma, unit)."""


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


SPIN_RASTERS = ("deer_raster", "deer_survey", "deer_zoom")
"""Measurement names of the spin rasters of coupling class 1 (class k > 1: ``name_k``)."""


def _psf_and_line(cat: Any, uids: dict[str, str], psf_name: str = "psf_map",
                  spectrum_name: str = "deer_spectrum", model: str = "single"
                  ) -> tuple[Any, Any]:
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


def _spin_psf_and_line(cat: Any, uids: dict[str, str]) -> tuple[Any, Any]:
    """The spin rasters' PSF map and dark-spin line (a layer's spectrum when no own one)."""
    if "deer_spectrum" not in uids and "layer_spectrum" in uids:
        return _psf_and_line(cat, uids, spectrum_name="layer_spectrum", model="bath")
    return _psf_and_line(cat, uids)


def _class_rasters(uids: dict[str, str]) -> list[list[str]]:
    """Spin raster names per coupling class (fine raster first: it seeds the fit)."""
    classes = []
    for k in range(1, 10):
        names = [m if k == 1 else f"{m}_{k}" for m in SPIN_RASTERS]
        present = [m for m in names if m in uids]
        if present:
            classes.append(present)
    return classes


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

    detuning, line = _spin_psf_and_line(cat, uids)
    coupling = None               # several or no couplings seen: from w and the geometry
    if content is None:
        coupling = fit_deer_evolution(load_run(cat, uids["deer_evolution"], ["deer_evolution"]))
    elif len(content.couplings_hz) == 1:
        coupling = CouplingFit(content.couplings_hz[0], content.coupling_sigmas_hz[0],
                               content.amplitudes[0], 0.0, float("nan"))
    results, first_class = [], []
    for k, names in enumerate(_class_rasters(uids)):
        deer = [load_run(cat, uids[m], ["deer_raster"]) for m in names]
        if layer is not None:
            deer = [with_layer_background(d, detuning, line, layer, fallback=layer_detuning)
                    for d in deer]
        single = len(_class_rasters(uids)) == 1
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


def layers_result(cat: Any, uids: dict[str, str]) -> dict[str, Any]:
    """Height (image) and density (tip-free decay) of a layer from its runs."""
    from nvmri_bluesky.reconstruct.layer_fits import fit_layer_decay, fit_layer_image

    detuning, line = _psf_and_line(cat, uids, "layer_psf_map", "layer_spectrum", model="bath")
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


def _located(spin: dict[str, Any]) -> bool:
    """Every offset of a ``spins`` entry determined."""
    return all(spin[a]["value"] is not None for a in ("dx_nm", "dy_nm", "dz_nm"))


def _fine_map(result: Any, rasters: list[Any], detuning: Any, line: Any) -> Any:
    """Fig. 4's fine-voxel density around the strongest spin from all the class's rasters
    (``density.fine_density``; None without a spin)."""
    from nvmri_bluesky.reconstruct.density import fine_density

    if not result.spins:
        return None
    return fine_density(rasters, detuning, line, result.spins[0].offset_nm,
                        spins=[[*s.offset_nm, s.weight] for s in result.spins],
                        shift_hz=result.line_shift_hz, layer_scale=result.layer_scale[0])


def _vetted_by_evolution(cat: Any, uids: dict[str, str], spins: list[Any],
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
    if _class_rasters(uids):
        spin_detuning, line = _spin_psf_and_line(cat, uids)
    refuted = any(r["kind"] == "layer" for r in part.get("rejected", []))
    content, evolution = (evolution_report(cat, uids, line, layer_refuted=refuted)
                          if "deer_evolution" in uids else (None, {}))
    part.update(evolution)
    if _class_rasters(uids):
        result, rasters, spins = spins_result(cat, uids, layer=layer, content=content,
                                              layer_detuning=found["detuning"] if found else None)
        entries = spins_report(replace(result, spins=tuple(spins)))
        # below the prior's coupling by more than 3 sigma (a true 50 kHz spin is kept)
        weak = [abs(s.coupling_hz) + 3 * s.coupling_sigma_hz < PRIOR_MIN_COUPLING_HZ
                for s in spins]
        part.setdefault("rejected", []).extend(
            {"kind": "spin", "why": f"coupling more than 3 sigma below the searched prior's "
             f"{PRIOR_MIN_COUPLING_HZ / 1e3:g} kHz (e.g. a layer spin near the NV)", **e}
            for e, w in zip(entries, weak, strict=True) if _located(e) and w)
        candidates = [i for i, (e, w) in enumerate(zip(entries, weak, strict=True))
                      if _located(e) and not w]
        decay_height = (layer.height_nm if layer is not None
                        else content.layer_height_nm if content is not None and content.layer
                        else None)
        kept, contradicted = _vetted_by_evolution(cat, uids, [spins[i] for i in candidates],
                                                  [entries[i] for i in candidates], line,
                                                  decay_height)
        part["spins"] = [{"sample": sample, **e} for _, e in kept]
        part["rejected"].extend(contradicted)
        located = [s.coupling_hz for s, _ in kept]
        dropped = [spins[i] for i in candidates if not any(spins[i] is s for s, _ in kept)]
        result = replace(result, spins=tuple(s for s in result.spins
                                             if not any(s is d for d in dropped)))
        if layer is not None and located:       # the joint decay model: layer + spins
            part["layers"] = [{"sample": sample,
                               **layer_with_spins(cat, uids, found, located)}]
        if layer is not None and part["layers"]:
            # the joint spin fit's layer scale: the layer's density as the spin rasters see it
            scale, scale_sigma = result.layer_scale
            part["layers"][0]["density_in_spin_rasters_per_nm2"] = quantity(
                scale * layer.density_per_nm2, scale_sigma * layer.density_per_nm2)
        part.setdefault("rejected", []).extend(
            {"kind": "spin", "why": "an offset ended on the search box's bound: an object "
             "outside the searched volume (e.g. a layer spin), not a located spin", **e}
            for e in entries if not _located(e))
        if result.spins:
            part["resolution_nm"] = resolution_report(result)
            part.update(snr_gain_part(cat, uids))
        zoom = load_run(cat, uids["deer_zoom"], ["deer_raster"]) if "deer_zoom" in uids else None
        figures.spins(rasters[0], result, out / f"fig4_spins_{sample}.png", zoom=zoom,
                      fine=_fine_map(result, rasters, spin_detuning, line))
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
        extra = {k: objects.pop(k) for k in ("evolution", "rejected") if k in objects}
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


def _fmt(q: dict | None, scale: float = 1.0) -> str:
    if not q or q.get("value") is None:
        return "n/a"
    sigma = q.get("sigma")
    return (f"{q['value'] * scale:.3g} +/- {sigma * scale:.2g}" if sigma is not None
            else f"{q['value'] * scale:.3g}")


def table(report: dict[str, Any]) -> str:
    """The paper's values beside the measured ones, as text."""
    rows = [("quantity", "paper", "measured")]

    def paper(key: str) -> str:
        v, s, unit = PAPER[key]
        return f"{v:g}{'' if s is None else f' +/- {s:g}'} {unit}"

    rows.append(("Fig.2a fringe period (nm)", paper("ramsey_fringe_period_nm"),
                 _fmt(report["ramsey_fringe_period_nm"])))
    rows.append(("Fig.2a gradient, linear Zeeman from the fringes (G/nm)",
                 paper("gradient_gauss_per_nm"), _fmt(report["gradient_gauss_per_nm"])))
    if "field_gradient_gauss_per_nm" in report:
        rows.append(("  exact gradient of B_par, both transitions (G/nm)", "-",
                     _fmt(report["field_gradient_gauss_per_nm"])))
    rows.append(("Fig.2b CW slice FWHM (nm)", paper("esr_slice_fwhm_nm"),
                 _fmt(report["esr_slice_fwhm_nm"])))
    for i, layer in enumerate(report["layers"]):
        key = "layer height nv2" if "nv2" in layer.get("sample", "") else "layer height nv1"
        rows.append((f"Fig.3 layer height above NV ({layer.get('sample', i)})", paper(key),
                     _fmt(layer["height_above_nv_nm"])))
        rows.append((f"Fig.3 layer density ({layer.get('sample', i)})", paper("layer density"),
                     _fmt(layer["density_per_nm2"])))
        if "coupling_rate_hz" in layer:
            rows.append((f"Fig.3d NV-layer coupling, rms (kHz) ({layer.get('sample', i)})",
                         paper("layer coupling"), _fmt(layer["coupling_rate_hz"], 1e-3)))
    for spin in report["spins"]:
        for axis in ("dx", "dy", "dz"):
            rows.append((f"Fig.4 spin {axis} ({spin.get('sample', '')})",
                         paper(f"spin {axis}"), _fmt(spin[f"{axis}_nm"])))
        rows.append(("Fig.4 spin coupling (kHz)", "-", _fmt(spin["coupling_hz"], 1e-3)))
    for axis in ("lateral", "vertical"):
        rows.append((f"resolution {axis} (nm)", paper(f"resolution {axis}"),
                     _fmt(report["resolution_nm"][axis])))
    if "snr_gain_quantum_over_classical" in report:
        rows.append(("Fig.4a SNR gain, quantum over classical spin", paper("snr gain"),
                     _fmt(report["snr_gain_quantum_over_classical"])))
    rows += _time_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _hours(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def _time_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Instrument time (shots x program + travel) beside this run's wall time, per sample."""
    times = report.get("instrument_time_s") or {}
    walls = report.get("sample_wall_s") or {}
    rows = [(f"instrument time, {sample} (wall {walls[sample]:.0f} s)" if sample in walls
             else f"instrument time, {sample}", "-", _hours(t))
            for sample, t in (times.get("samples") or {}).items()]
    if times.get("samples"):
        wall = report.get("elapsed_s")
        rows.append(("instrument time, total" + (f" (wall {wall:.0f} s)" if wall else ""), "-",
                     _hours(times.get("total"))))
    return rows


def _related_runs(cat: Any, start: dict[str, Any]) -> dict[str, str]:
    """The protocol runs of the same sample (same PV prefix) up to this one, newest first."""
    related: dict[str, str] = {}
    for row in cat.runs():
        other = cat.run(row.uid).metadata["start"]
        if other.get("prefix") != start.get("prefix") or other["time"] > start["time"]:
            continue
        key = other.get("measurement") or other.get("plan_name")
        related.setdefault(key, other["uid"])
    return related


def reconstruct_run(cat: Any, uid: str) -> dict[str, Any]:
    """Reconstruct one stored run (with the runs of its sample it needs), report.json shape."""
    from nvmri_bluesky.errors import NvmriError

    start = cat.run(uid).metadata["start"]
    plan = start.get("plan_name")
    uids = {**_related_runs(cat, start), start.get("measurement") or plan: start["uid"]}
    out: dict[str, Any] = {"uid": start["uid"], "plan_name": plan,
                           "scenario": start.get("scenario", "")}
    if plan == "deer_raster":
        layer = start.get("measurement") == "layer_raster"
        if not start.get("measurement"):
            uids["deer_raster"] = start["uid"]
        needed = (("layer_psf_map", "layer_spectrum", "layer_decay") if layer
                  else ("psf_map", "deer_spectrum", "deer_evolution"))
        missing = [m for m in needed if m not in uids]
        if missing:
            raise NvmriError(f"run {uid[:8]}: the catalog has no {' or '.join(missing)} run "
                             "of the same instrument before it (needed for the PSF)")
        if layer:
            out["layers"] = [layers_result(cat, uids)["report"]]
        else:
            result, rasters, _ = spins_result(cat, uids)
            deer = rasters[0]
            out["spins"] = spins_report(result)
            out["resolution_nm"] = resolution_report(result)
            if not deer.attrs.get("complete", True):
                out["note"] = (f"run cut short: reconstructed from {deer.attrs['points_measured']}"
                               f" of {deer.attrs['points_planned']} points")
    elif plan in ("ramsey_raster", "esr_raster", "psf_map") and "ramsey_line" in uids:
        out.update(calibration_report(cat, uids))
    else:
        raise NvmriError(f"run {uid[:8]} is a {plan!r} run: nvmri reconstruct takes "
                         "deer_raster runs (spins, layers) and the Fig. 2 calibration lines")
    return out


def cli_reconstruct(uid: str, location: str | None, api_key: str | None = None,
                    as_json: bool = False) -> str:
    """``nvmri reconstruct``: the result as JSON or as readable lines."""
    import json

    from nvmri_bluesky.catalog import open_catalog

    with open_catalog(location, api_key=api_key) as cat:
        result = reconstruct_run(cat, uid)
    if as_json:
        return json.dumps(result, indent=2)
    lines = [f"run {result['uid'][:8]} ({result['plan_name']}, {result['scenario']})"]
    for key, value in result.items():
        if key in ("uid", "plan_name", "scenario"):
            continue
        lines.append(f"  {key}: {json.dumps(value)}")
    return "\n".join(lines)
