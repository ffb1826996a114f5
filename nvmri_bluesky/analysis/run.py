"""``nvmri reconstruct``: one stored run, with the runs of its sample it needs."""

from __future__ import annotations

from typing import Any

from nvmri_bluesky.analysis.calibration import calibration_report
from nvmri_bluesky.analysis.layers import layers_result
from nvmri_bluesky.analysis.spins import spins_result
from nvmri_bluesky.reconstruct.report import resolution_report, spins_report


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
    elif plan in ("deer_points", "adaptive_stop"):    # the adaptive protocol, up to this run
        missing = [m for m in ("psf_map", "deer_spectrum", "deer_evolution", "deer_survey")
                   if m not in uids]
        if missing:
            raise NvmriError(f"run {uid[:8]}: the catalog has no {' or '.join(missing)} run "
                             "of the same instrument before it (needed for the PSF and start)")
        result, _, _ = spins_result(cat, uids)
        out["spins"] = spins_report(result)
        out["resolution_nm"] = resolution_report(result)
        out["adaptive_batches"] = [m for m in uids if m.startswith("deer_adaptive_")]
    elif plan in ("ramsey_raster", "esr_raster", "psf_map") and "ramsey_line" in uids:
        out.update(calibration_report(cat, uids))
    else:
        raise NvmriError(f"run {uid[:8]} is a {plan!r} run: nvmri reconstruct takes "
                         "deer_raster runs (spins, layers), the adaptive protocol's deer_points "
                         "and adaptive_stop runs, and the Fig. 2 calibration lines")
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
