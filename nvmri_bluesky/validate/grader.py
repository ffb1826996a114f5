"""``nvmri validate``'s grader: a report.json dict against the truth of its sample.

:func:`grade_report` and :func:`grade_sample` give found / missed / spurious
spins and layers, per-axis errors and their sigmas, and a one-line cause for
every failure; :func:`summarise` pools the samples (coverage, medians, the
issue's acceptance criteria).  Pure functions: the grader reads nothing but
report.json and the truth the generator made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nvmri_bluesky.validate.generator import Truth, xyz_text

__all__ = ["AXES", "CRITERIA", "match_spins", "grade_report", "grade_sample",
           "instrument_time_s", "summarise"]

AXES = ("dx", "dy", "dz")

# ---------------------------------------------------------------- grading thresholds

GATE_SIGMAS = 3.0
"""A reported spin matches a true one if every axis is within max(3 sigma, GATE_NM)."""
GATE_NM = 1.0
OFFSET_SIGMAS = 3.0
"""A matched spin passes if every axis is within 3 sigma *and* OFFSET_NM ..."""
OFFSET_NM = 0.3
MAX_SIGMA_NM = 0.5
"""... and every sigma is at most this, nm."""
LAYER_GATE_NM = 1.0
"""A reported layer matches the true one if its height is within max(3 sigma, 1 nm)."""
LAYER_HEIGHT_NM = 1.0
"""A matched layer passes if its height is within this, nm ..."""
LAYER_DENSITY_REL = 0.30
"""... and its density within this fraction of the truth."""
CRITERIA = {"spins_found_min": 0.95, "spurious_max": 1, "coverage1": (0.60, 0.76),
            "coverage2": (0.90, 0.98), "errors_max": 0}
"""The issue's acceptance criteria for ``nvmri validate --seeds 30``."""



# ---------------------------------------------------------------- grader

def _quantity(q: Any) -> tuple[float | None, float | None, str]:
    """(value, sigma, why) of a report quantity; None where missing or not finite."""
    if isinstance(q, int | float) and not isinstance(q, bool):
        q = {"value": q}
    if not isinstance(q, Mapping):
        return None, None, "missing"
    return _finite(q.get("value")), _finite(q.get("sigma")), str(q.get("why") or "")


def _finite(x: Any) -> float | None:
    ok = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def _sigma_problem(name: str, value: float | None, sigma: float | None, why: str) -> str | None:
    """The cause if a quantity is not a measurement (undetermined, sigma 0 or missing)."""
    if value is None:
        return f"{name} not determined" + (f" ({why})" if why else "")
    if sigma is None:
        return f"{name} = {value:.3g} without a finite sigma"
    if sigma <= 0:
        return f"{name} = {value:.3g} +/- 0 (failed fit)"
    return None


def _reported_spins(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each reported spin as {"value": (3,), "sigma": (3,), "problems": [...]}."""
    out = []
    for spin in report.get("spins") or []:
        values, sigmas, problems = [], [], []
        for axis in AXES:
            v, s, why = _quantity(spin.get(f"{axis}_nm"))
            values.append(np.nan if v is None else v)
            sigmas.append(np.nan if s is None or s <= 0 else s)
            problem = _sigma_problem(axis, v, s, why)
            if problem:
                problems.append(problem)
        out.append({"value": np.array(values), "sigma": np.array(sigmas),
                    "problems": problems})
    return out


def _gate(err: np.ndarray, sigma: np.ndarray, gate_nm: float) -> np.ndarray:
    """|err| <= max(3 sigma, gate_nm), elementwise (a NaN sigma means gate_nm)."""
    width = np.fmax(GATE_SIGMAS * np.nan_to_num(sigma, nan=0.0), gate_nm)
    return np.abs(err) <= width


def match_spins(true: np.ndarray, found: np.ndarray, sigma: np.ndarray
                ) -> list[tuple[int, int]]:
    """Pairs (true index, reported index): Hungarian assignment inside the gate.

    The cost is the Euclidean distance; a pair is allowed only when every
    axis is within max(:data:`GATE_SIGMAS` sigma, :data:`GATE_NM`) (a reported
    spin with an undetermined axis matches nothing).

    Parameters
    ----------
    true : ndarray, shape (n, 3)
        True offsets, nm.
    found : ndarray, shape (m, 3)
        Reported offsets, nm (NaN: not determined).
    sigma : ndarray, shape (m, 3)
        Their sigmas, nm (NaN: none).

    Returns
    -------
    list of (int, int)
    """
    from scipy.optimize import linear_sum_assignment

    if len(true) == 0 or len(found) == 0:
        return []
    err = found[None, :, :] - true[:, None, :]
    allowed = np.all(_gate(err, sigma[None, :, :], GATE_NM), axis=-1)
    cost = np.where(allowed, np.linalg.norm(np.nan_to_num(err, nan=1e6), axis=-1), 1e9)
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if allowed[i, j]]


def _offset_causes(err: np.ndarray, sigma: np.ndarray) -> list[str]:
    """Why a matched spin fails: each axis beyond 3 sigma, 0.3 nm, or with sigma > 0.5 nm."""
    causes = []
    for axis, e, s in zip(AXES, err, sigma, strict=True):
        if np.isfinite(s) and abs(e) > OFFSET_SIGMAS * s:
            causes.append(f"offset {abs(e) / s:.1f} sigma on {axis} ({e:+.2f} nm)")
        elif abs(e) > OFFSET_NM:
            causes.append(f"offset {e:+.2f} nm on {axis} (> {OFFSET_NM} nm)")
        if np.isfinite(s) and s > MAX_SIGMA_NM:
            causes.append(f"sigma {s:.2f} nm on {axis} (> {MAX_SIGMA_NM} nm)")
    return causes


def _grade_spins(truth: Truth, report: Mapping[str, Any]) -> dict[str, Any]:
    true = np.array(truth.spins, float).reshape(-1, 3)
    reported = _reported_spins(report)
    found = np.array([r["value"] for r in reported], float).reshape(-1, 3)
    sigma = np.array([r["sigma"] for r in reported], float).reshape(-1, 3)
    pairs = match_spins(true, found, sigma)
    causes: list[str] = []
    errors: dict[str, list[list[float | None]]] = {a: [] for a in AXES}
    for i, j in pairs:
        err = found[j] - true[i]
        for k, axis in enumerate(AXES):
            errors[axis].append([float(err[k]), _none(sigma[j, k])])
        at = f"spin at ({xyz_text(true[i])})"
        causes += [f"{at}: {c}" for c in reported[j]["problems"] + _offset_causes(err, sigma[j])]
    matched_true = {i for i, _ in pairs}
    matched_found = {j for _, j in pairs}
    for i in sorted(set(range(len(true))) - matched_true):
        causes.append(f"missed spin at ({xyz_text(true[i])}) nm, "
                      f"{abs(truth.couplings_hz[i]) / 1e3:.0f} kHz")
    for j in sorted(set(range(len(found))) - matched_found):
        where = (f"({xyz_text(found[j])}) nm" if np.all(np.isfinite(found[j]))
                 else "(" + "; ".join(reported[j]["problems"]) + ")")
        causes.append(f"spurious spin at {where}{_nearest(true, found[j], sigma[j])}")
    return {"spins_true": len(true), "spins_found": len(pairs),
            "spins_missed": len(true) - len(pairs),
            "spins_spurious": len(found) - len(pairs), "errors": errors, "causes": causes}


def _nearest(true: np.ndarray, found: np.ndarray, sigma: np.ndarray) -> str:
    """'; nearest true spin off by ... on <axis>' (the worst axis), or '' if none applies."""
    if len(true) == 0 or not np.all(np.isfinite(found)):
        return ""
    err = found - true[np.argmin(np.linalg.norm(true - found, axis=1))]
    k = int(np.argmax(np.abs(err)))
    z = f", {abs(err[k]) / sigma[k]:.1f} sigma" if np.isfinite(sigma[k]) else ""
    return f"; nearest true spin off by {err[k]:+.2f} nm{z} on {AXES[k]}"


def _none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _grade_layers(truth: Truth, report: Mapping[str, Any]) -> dict[str, Any]:
    """The true layer (if any) matched to the nearest reported height inside the gate."""
    layers = [(_quantity(layer.get("height_above_nv_nm")),
               _quantity(layer.get("density_per_nm2"))) for layer in report.get("layers") or []]
    causes: list[str] = []
    match = None
    if truth.layer_height_nm is not None:
        h_true = truth.layer_height_nm
        inside = [(abs(h[0] - h_true), j) for j, (h, _) in enumerate(layers)
                  if h[0] is not None
                  and abs(h[0] - h_true) <= max(GATE_SIGMAS * (h[1] or 0.0), LAYER_GATE_NM)]
        match = min(inside)[1] if inside else None
        if match is None:
            causes.append(f"missed layer (height {h_true:.2f} nm, "
                          f"{truth.layer_density_per_nm2:.2f}/nm^2)")
        else:
            causes += _layer_causes(truth, *layers[match])
    for j, (h, _) in enumerate(layers):
        if j != match:
            where = (f"height {h[0]:.2f} nm" if h[0] is not None
                     else _sigma_problem("height", *h))
            causes.append(f"spurious layer ({where})")
    found = int(match is not None)
    result = {"layers_true": int(truth.layer_height_nm is not None), "layers_found": found,
              "layers_missed": int(truth.layer_height_nm is not None) - found,
              "layers_spurious": len(layers) - found, "causes": causes}
    if match is not None:
        (h, hs, _), (d, ds, _) = layers[match]
        result["layer"] = {"height_error_nm": h - truth.layer_height_nm, "height_sigma_nm": hs,
                           "density": d, "density_sigma": ds}
    return result


def _layer_causes(truth: Truth, height: tuple, density: tuple) -> list[str]:
    causes = []
    for name, q in (("layer height", height), ("layer density", density)):
        problem = _sigma_problem(name, *q)
        if problem:
            causes.append(problem)
    dh = height[0] - truth.layer_height_nm
    if abs(dh) > LAYER_HEIGHT_NM:
        causes.append(f"layer height off by {dh:+.2f} nm (> {LAYER_HEIGHT_NM} nm)")
    rho = truth.layer_density_per_nm2
    if density[0] is not None and abs(density[0] - rho) > LAYER_DENSITY_REL * rho:
        causes.append(f"layer density {density[0]:.2f} vs {rho:.2f}/nm^2 "
                      f"({100 * (density[0] / rho - 1):+.0f} %)")
    return causes


def instrument_time_s(report: Mapping[str, Any]) -> float | None:
    """The report's total instrument time, s, if it records one (key names vary)."""
    for key in ("instrument_time_s", "instrument_time_total_s", "instrument_time"):
        value = report.get(key)
        if isinstance(value, Mapping):
            for sub in ("total", "total_s", "value", "sample", "sample_s"):
                if sub in value:
                    value = value[sub]
                    break
            else:
                numbers = [v for v in value.values() if isinstance(v, int | float)]
                value = sum(numbers) if numbers else None
        got = _quantity(value)[0]
        if got is not None:
            return got
    return None


def grade_report(truth: Truth, report: Mapping[str, Any]) -> dict[str, Any]:
    """Grade one report.json dict against the truth of its sample.

    Parameters
    ----------
    truth : Truth
    report : dict
        report.json's content (optional keys may be missing).

    Returns
    -------
    dict
        ``spins_true/found/missed/spurious``, ``layers_*`` likewise,
        ``errors`` (axis -> [[error_nm, sigma_nm or None], ...] of matched
        spins), ``layer`` (errors of the matched layer, if any), ``causes``
        (one line per failure), ``instrument_time_s`` (None if not recorded),
        ``detection_limit_hz`` (None if not recorded) and ``passed``.
    """
    spins, layers = _grade_spins(truth, report), _grade_layers(truth, report)
    causes = spins.pop("causes") + layers.pop("causes")
    return {**spins, **layers, "causes": causes, "passed": not causes,
            "instrument_time_s": instrument_time_s(report),
            "detection_limit_hz": _quantity(report.get("detection_limit_hz"))[0]}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output on stderr)"


def grade_sample(truth: Truth, returncode: int | None, report: Mapping[str, Any] | None,
                 stderr: str = "", wall_s: float | None = None) -> dict[str, Any]:
    """Grade one finished (or failed) demo run.

    Parameters
    ----------
    truth : Truth
    returncode : int or None
        The demo's exit status; None if it timed out.
    report : dict or None
        report.json's content, None if none was written (or unreadable).
    stderr : str
        The demo's stderr; its last line is the cause of a failed run.
    wall_s : float, optional
        Wall time of the run, s.

    Returns
    -------
    dict
        :func:`grade_report`'s result plus ``seed``, ``kind``, ``truth``,
        ``status`` ("pass", "fail" or "error": an exception, a non-zero exit,
        a timeout or no report) and ``wall_s``.
    """
    head = {"seed": truth.seed, "kind": truth.kind, "truth": truth.describe(), "wall_s": wall_s}
    if returncode != 0 or report is None:
        cause = ("timed out" if returncode is None else
                 _last_line(stderr) if returncode != 0 else "exit 0 but no readable report.json")
        empty = grade_report(truth, {})
        return {**head, **empty, "status": "error", "passed": False, "causes": [cause]}
    graded = grade_report(truth, report)
    return {**head, **graded, "status": "pass" if graded["passed"] else "fail"}


def _coverage(z: np.ndarray) -> dict[str, float | None]:
    return {f"{k}sigma": (float(np.mean(np.abs(z) <= k)) if len(z) else None) for k in (1, 2, 3)}


def _axis_summary(pairs: list[list[float | None]]) -> dict[str, Any]:
    err = np.array([e for e, _ in pairs], float)
    z = np.array([e / s for e, s in pairs if s], float)
    return {"n": len(err), "n_with_sigma": len(z),
            "median_abs_error_nm": float(np.median(np.abs(err))) if len(err) else None,
            "max_abs_error_nm": float(np.max(np.abs(err))) if len(err) else None,
            "coverage": _coverage(z)}


def _within(x: float | None, bounds: tuple[float, float]) -> bool:
    return x is not None and bounds[0] <= x <= bounds[1]


def summarise(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool graded samples: totals, per-axis error and coverage, the acceptance criteria.

    Parameters
    ----------
    samples : sequence of dict
        :func:`grade_sample` results.

    Returns
    -------
    dict
        Totals (``spins_true`` ..., ``errors`` (samples that ended in an
        error), ``passed``), ``axes`` (axis -> n, median/max |error|,
        coverage at 1, 2, 3 sigma), wall and instrument time, and
        ``criteria`` (name -> bool).
    """
    keys = [f"{o}_{c}" for o in ("spins", "layers")
            for c in ("true", "found", "missed", "spurious")]
    tot: dict[str, Any] = {k: int(sum(s[k] for s in samples)) for k in keys}
    tot["samples"] = len(samples)
    tot["passed"] = sum(bool(s["passed"]) for s in samples)
    tot["errors"] = sum(s["status"] == "error" for s in samples)
    tot["axes"] = {a: _axis_summary([p for s in samples for p in s["errors"][a]]) for a in AXES}
    walls = [s["wall_s"] for s in samples if s.get("wall_s") is not None]
    inst = [s["instrument_time_s"] for s in samples if s.get("instrument_time_s") is not None]
    tot["wall_s"] = {"total": float(sum(walls)), "median": _median(walls)}
    tot["instrument_time_s"] = {"total": float(sum(inst)) if inst else None,
                                "median": _median(inst), "samples_with_it": len(inst)}
    found = tot["spins_found"] / tot["spins_true"] if tot["spins_true"] else None
    cov = {k: [tot["axes"][a]["coverage"][k] for a in AXES] for k in ("1sigma", "2sigma")}
    tot["spins_found_fraction"] = found
    tot["criteria"] = {
        "spins found >= 95 %": found is not None and found >= CRITERIA["spins_found_min"],
        "spurious spins + layers <= 1":
            tot["spins_spurious"] + tot["layers_spurious"] <= CRITERIA["spurious_max"],
        "1-sigma coverage 60-76 % per axis": all(_within(c, CRITERIA["coverage1"])
                                                 for c in cov["1sigma"]),
        "2-sigma coverage 90-98 % per axis": all(_within(c, CRITERIA["coverage2"])
                                                 for c in cov["2sigma"]),
        "no sample ended in an error": tot["errors"] <= CRITERIA["errors_max"],
    }
    return tot


def _median(xs: Sequence[float]) -> float | None:
    return float(np.median(xs)) if len(xs) else None
