"""``nvmri validate``: the default protocol on random samples, graded against their truth.

Three parts, the first two pure functions:

* **generator** (:func:`draw_sample`): seed -> :class:`Truth` (NV depth,
  point spins as offsets from the NV, an optional surface layer) and the
  scenario file that describes it (:meth:`Truth.scenario`); the distribution
  is documented in ``docs/validation.md``;
* **grader** (:func:`grade_report`, :func:`grade_sample`): a report.json
  dict against the truth -> found / missed / spurious spins and layers,
  per-axis errors and their sigmas, and a one-line cause for every failure;
  :func:`summarise` pools the samples (coverage, medians, the issue's
  acceptance criteria);
* **runner** (:func:`run`): writes each scenario file and runs the command a
  user types, ``nvmri demo --scenario FILE --out DIR``, in a subprocess (the
  demo starts its own IOC on its own Channel Access port), then grades
  ``DIR/report.json`` and prints a table.

The grader reads nothing but report.json and the truth the generator made.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError

__all__ = [
    "KINDS", "AXES", "CRITERIA", "Truth", "draw_sample", "match_spins", "grade_report",
    "grade_sample", "instrument_time_s", "summarise", "table", "nvmri_command", "run_sample",
    "run",
]

# ---------------------------------------------------------------- the envelope

KINDS = ("single", "layer", "spin+layer", "shallow", "pair", "weak+strong", "empty",
         "triple", "random")
"""Sample kinds; seed s draws kind ``KINDS[s % len(KINDS)]`` (every kind in any 9 seeds)."""
AXES = ("dx", "dy", "dz")
DEPTH_NM = (6.0, 16.0)
"""NV depth below the surface, uniform, nm."""
SHALLOW_DEPTH_NM = (6.0, 7.0)
"""NV depth of the ``shallow`` kind, uniform, nm."""
LATERAL_NM = 8.0
"""|dx|, |dy| <= this (spin minus NV), nm."""
DZ_NM = (-6.0, 2.0)
"""dz range (spin minus NV, + is towards the surface), nm."""
MIN_COUPLING_HZ = 50e3
"""|nu| of every point spin >= this, Hz."""
MIN_SEPARATION_NM = 3.0
"""Point spins are >= this far from each other and from the NV, nm."""
WEAK_RATIO = (0.09, 0.11)
"""``weak+strong``: |nu_weak| / |nu_strong| in this range (1/10 +/- 10 %)."""
DENSITY_PER_NM2 = (0.1, 1.0)
"""Layer density, uniform, spins/nm^2."""
LAYER_RADIUS_NM = 40.0
"""Radius of the layer disc (centred above the NV at z = 0), nm."""
_MAX_TRIES = 200_000
_GENERATOR_TAG = 0x5EED

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


# ---------------------------------------------------------------- generator

@dataclass(frozen=True)
class Truth:
    """What the generator put in one sample (nothing else knows it).

    Attributes
    ----------
    seed : int
        The sample's seed (also the scenario's seed: noise, layer spins).
    kind : str
        One of :data:`KINDS`.
    depth_nm : float
        NV depth below the surface, nm.
    spins : tuple of (dx, dy, dz)
        Point spins, offsets spin minus NV, nm.
    couplings_hz : tuple of float
        Their secular couplings to the NV (``physics.dipolar_coupling``), Hz.
    layer_density_per_nm2 : float or None
        Density of the surface layer (z = 0), None if there is none.
    """

    seed: int
    kind: str
    depth_nm: float
    spins: tuple[tuple[float, float, float], ...] = ()
    couplings_hz: tuple[float, ...] = ()
    layer_density_per_nm2: float | None = None

    @property
    def name(self) -> str:
        """The scenario's name."""
        return f"validate-{self.seed:04d}"

    @property
    def layer_height_nm(self) -> float | None:
        """Height of the layer above the NV (it sits at the surface), nm."""
        return None if self.layer_density_per_nm2 is None else self.depth_nm

    def scenario(self) -> dict[str, Any]:
        """The scenario file's content (schema of :mod:`nvmri_bluesky.sim.scenario`)."""
        points = [{"x_nm": dx, "y_nm": dy, "z_nm": dz - self.depth_nm}
                  for dx, dy, dz in self.spins]
        layers = ([] if self.layer_density_per_nm2 is None else
                  [{"z_nm": 0.0, "density_per_nm2": self.layer_density_per_nm2,
                    "radius_nm": LAYER_RADIUS_NM}])
        return {"name": self.name, "seed": self.seed, "nv": {"depth_nm": self.depth_nm},
                "dark_spins": {"points": points, "layers": layers}}

    def describe(self) -> str:
        """One line: depth, spins with couplings, layer."""
        parts = [f"NV {self.depth_nm:.1f} nm"]
        parts += [f"spin ({_xyz(s)}) {abs(nu) / 1e3:.0f} kHz"
                  for s, nu in zip(self.spins, self.couplings_hz, strict=True)]
        if self.layer_density_per_nm2 is not None:
            parts.append(f"layer {self.layer_density_per_nm2:.2f}/nm^2")
        return ", ".join(parts) if len(parts) > 1 else parts[0] + ", nothing"


def _xyz(v: Sequence[float]) -> str:
    return ", ".join(f"{c:+.2f}" for c in v)


def _nv_axis() -> np.ndarray:
    """The NV axis (and B0 direction) every generated scenario uses (the default)."""
    return physics.Instrument().nv_axis


def _acceptable(offset: np.ndarray, others: Sequence[np.ndarray], nu_min: float) -> bool:
    if np.linalg.norm(offset) < MIN_SEPARATION_NM:
        return False
    if any(np.linalg.norm(offset - o) < MIN_SEPARATION_NM for o in others):
        return False
    return abs(float(physics.dipolar_coupling(offset, _nv_axis()))) >= nu_min


def _draw_spin(rng: np.random.Generator, others: Sequence[np.ndarray],
               accept: Callable[[np.ndarray], bool] = lambda o: True,
               nu_min: float = MIN_COUPLING_HZ) -> np.ndarray:
    """One offset uniform in the box, >= 3 nm from the NV and ``others``, |nu| >= nu_min."""
    for _ in range(_MAX_TRIES):
        offset = np.array([rng.uniform(-LATERAL_NM, LATERAL_NM),
                           rng.uniform(-LATERAL_NM, LATERAL_NM), rng.uniform(*DZ_NM)])
        if _acceptable(offset, others, nu_min) and accept(offset):
            return np.round(offset, 3)
    raise NvmriError("validate generator: no spin position satisfies the constraints")


def _draw_spins(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    spins: list[np.ndarray] = []
    for _ in range(n):
        spins.append(_draw_spin(rng, spins))
    return spins


def _draw_weak_strong(rng: np.random.Generator) -> list[np.ndarray]:
    """A strong spin (|nu| >= 10 x 50 kHz) and one coupled 1/10 as strongly."""
    strong = _draw_spin(rng, [], nu_min=MIN_COUPLING_HZ / WEAK_RATIO[0])
    nu_strong = abs(float(physics.dipolar_coupling(strong, _nv_axis())))

    def tenth(offset: np.ndarray) -> bool:
        ratio = abs(float(physics.dipolar_coupling(offset, _nv_axis()))) / nu_strong
        return WEAK_RATIO[0] <= ratio <= WEAK_RATIO[1]

    return [strong, _draw_spin(rng, [strong], accept=tenth)]


_CONTENT = {  # kind -> (number of point spins or None for random 0-3, layer: True/False/None)
    "single": (1, False), "layer": (0, True), "spin+layer": (1, True),
    "shallow": (1, None), "pair": (2, False), "weak+strong": (2, False),
    "empty": (0, False), "triple": (3, False), "random": (None, None),
}


def draw_sample(seed: int) -> Truth:
    """The sample of ``seed``: a pure function (same seed, same sample).

    Parameters
    ----------
    seed : int
        >= 0.  The kind is ``KINDS[seed % len(KINDS)]``; every continuous
        parameter comes from a generator seeded by (tag, seed).

    Returns
    -------
    Truth
    """
    if seed < 0:
        raise NvmriError(f"seeds must be >= 0, not {seed}")
    kind = KINDS[seed % len(KINDS)]
    rng = np.random.default_rng([_GENERATOR_TAG, seed])
    depth = rng.uniform(*(SHALLOW_DEPTH_NM if kind == "shallow" else DEPTH_NM))
    n_spins, layer = _CONTENT[kind]
    if n_spins is None:
        n_spins = int(rng.integers(0, 4))
    if layer is None:
        layer = bool(rng.random() < 0.5)
    spins = _draw_weak_strong(rng) if kind == "weak+strong" else _draw_spins(rng, n_spins)
    density = round(float(rng.uniform(*DENSITY_PER_NM2)), 3) if layer else None
    couplings = tuple(float(physics.dipolar_coupling(s, _nv_axis())) for s in spins)
    return Truth(seed=seed, kind=kind, depth_nm=round(float(depth), 3),
                 spins=tuple(tuple(float(c) for c in s) for s in spins),
                 couplings_hz=couplings, layer_density_per_nm2=density)


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
        at = f"spin at ({_xyz(true[i])})"
        causes += [f"{at}: {c}" for c in reported[j]["problems"] + _offset_causes(err, sigma[j])]
    matched_true = {i for i, _ in pairs}
    matched_found = {j for _, j in pairs}
    for i in sorted(set(range(len(true))) - matched_true):
        causes.append(f"missed spin at ({_xyz(true[i])}) nm, "
                      f"{abs(truth.couplings_hz[i]) / 1e3:.0f} kHz")
    for j in sorted(set(range(len(found))) - matched_found):
        where = (f"({_xyz(found[j])}) nm" if np.all(np.isfinite(found[j]))
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


# ---------------------------------------------------------------- table

def _n(x: float | None, fmt: str = ".0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} s"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(samples: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """The per-sample table, the pooled numbers, the criteria and every failure's cause."""
    rows = [("seed", "kind", "result", "spins f/m/s", "layers f/m/s", "wall s", "instr s",
             "truth")]
    for s in samples:
        rows.append((str(s["seed"]), s["kind"], s["status"].upper(),
                     f"{s['spins_found']}/{s['spins_missed']}/{s['spins_spurious']}",
                     f"{s['layers_found']}/{s['layers_missed']}/{s['layers_spurious']}",
                     _n(s.get("wall_s")), _n(s.get("instrument_time_s")), s["truth"]))
    lines = _columns(rows)
    t = summary
    lines += ["", f"samples {t['samples']}: {t['passed']} passed, "
                  f"{t['samples'] - t['passed'] - t['errors']} failed, {t['errors']} errors",
              f"spins  true {t['spins_true']}: found {t['spins_found']} "
              f"({_pct(t['spins_found_fraction'])}), missed {t['spins_missed']}, "
              f"spurious {t['spins_spurious']}",
              f"layers true {t['layers_true']}: found {t['layers_found']}, missed "
              f"{t['layers_missed']}, spurious {t['layers_spurious']}",
              f"wall time total {_s(t['wall_s']['total'])}, median "
              f"{_s(t['wall_s']['median'])} per sample; instrument time total "
              f"{_s(t['instrument_time_s']['total'])}, median "
              f"{_s(t['instrument_time_s']['median'])} per sample", ""]
    axis_rows = [("axis", "matched", "median |err| nm", "max |err| nm", "cov 1s", "cov 2s",
                  "cov 3s")]
    for axis, a in t["axes"].items():
        c = a["coverage"]
        axis_rows.append((axis, f"{a['n']} ({a['n_with_sigma']} with sigma)",
                          _n(a["median_abs_error_nm"], ".3f"), _n(a["max_abs_error_nm"], ".3f"),
                          _pct(c["1sigma"]), _pct(c["2sigma"]), _pct(c["3sigma"])))
    lines += _columns(axis_rows) + [""]
    lines += [f"[{'x' if ok else ' '}] {name}" for name, ok in t["criteria"].items()]
    failures = [(s["seed"], s["kind"], c) for s in samples for c in s["causes"]]
    if failures:
        lines += ["", "failures:"] + [f"  seed {seed} ({kind}): {c}" for seed, kind, c in failures]
    return "\n".join(lines)


# ---------------------------------------------------------------- runner

def nvmri_command() -> str:
    """The ``nvmri`` console script of this environment (beside the interpreter)."""
    beside = Path(sys.executable).with_name("nvmri")
    found = str(beside) if beside.exists() else shutil.which("nvmri")
    if not found:
        raise NvmriError("validate: the `nvmri` command is not installed next to "
                         f"{sys.executable} nor on PATH")
    return found


def _ca_env() -> dict[str, str]:
    """This environment with Channel Access on loopback only (the demo picks its ports)."""
    return {**os.environ, "EPICS_CA_ADDR_LIST": "127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST": "NO"}


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


_RUNNING: set[subprocess.Popen] = set()
"""The demos running now (stopped if ``nvmri validate`` is interrupted)."""


def _stop(proc: subprocess.Popen) -> None:
    """Stop a demo that ran out of time: Ctrl-C (it closes its IOC), then kill."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_sample(truth: Truth, workdir: Path, timeout_s: float | None = None,
               command: str | None = None) -> dict[str, Any]:
    """Write the sample's scenario file, run ``nvmri demo --scenario FILE --out DIR``, grade.

    Parameters
    ----------
    truth : Truth
    workdir : Path
        ``workdir/seed-NNNN/`` gets ``scenario.json``, ``demo/`` (the demo's
        ``--out``), ``stdout.txt``, ``stderr.txt`` and ``grade.json`` (the result).
    timeout_s : float, optional
        Stop the demo (Ctrl-C, then kill) after this many seconds.
    command : str, optional
        The ``nvmri`` executable (default :func:`nvmri_command`).

    Returns
    -------
    dict
        :func:`grade_sample`'s result, plus ``returncode`` and ``dir``.
    """
    from nvmri_bluesky.sim.scenario import load_scenario

    here = Path(workdir) / f"seed-{truth.seed:04d}"
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    scenario = here / "scenario.json"
    scenario.write_text(json.dumps(truth.scenario(), indent=2))
    load_scenario(scenario)                          # the loader validates what we wrote
    out = here / "demo"
    cmd = [command or nvmri_command(), "demo", "--scenario", str(scenario), "--out", str(out)]
    t0 = time.monotonic()
    with open(here / "stdout.txt", "w") as so, open(here / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=_ca_env(), cwd=here)
        _RUNNING.add(proc)
        try:
            returncode: int | None = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            returncode = None
        finally:
            _RUNNING.discard(proc)
    wall = time.monotonic() - t0
    report = _read_report(out / "report.json") if returncode == 0 else None
    stderr = (here / "stderr.txt").read_text(errors="replace")
    graded = grade_sample(truth, returncode, report, stderr, wall_s=round(wall, 1))
    if returncode is None:
        graded["causes"] = [f"timed out after {timeout_s:.0f} s (stopped)"]
    graded = {**graded, "returncode": returncode, "dir": str(here)}
    (here / "grade.json").write_text(json.dumps(graded, indent=2))
    return graded


def _progress(done: int, total: int, result: Mapping[str, Any]) -> None:
    first = result["causes"][0] if result["causes"] else ""
    more = f" (+{len(result['causes']) - 1} more)" if len(result["causes"]) > 1 else ""
    print(f"[{done}/{total}] seed {result['seed']} ({result['kind']}): "
          f"{result['status'].upper()} in {_n(result.get('wall_s'))} s"
          + (f": {first}{more}" if first else ""), file=sys.stderr, flush=True)


def _interrupt(futures: Sequence[Any]) -> None:
    """Ctrl-C: drop the samples not started, stop the running demos (each closes its IOC)."""
    for f in futures:
        f.cancel()
    print("validate: interrupted; stopping the running demos", file=sys.stderr, flush=True)
    for proc in list(_RUNNING):
        if proc.poll() is None:
            _stop(proc)


def run(seeds: int, jobs: int = 1, as_json: bool = False, out: str | Path = "nvmri-validate",
        start: int = 0, timeout_s: float | None = None) -> dict[str, Any]:
    """``nvmri validate``: run and grade seeds ``start .. start + seeds - 1``; print the result.

    Parameters
    ----------
    seeds : int
        Number of samples.
    jobs : int
        Samples run at once (each demo is its own process with its own IOC).
    as_json : bool
        Print JSON (``{"samples": [...], "summary": {...}}``) instead of the table.
    out : path
        Working directory (one sub-directory per sample, and ``validate.json``).
    start : int
        First seed.
    timeout_s : float, optional
        Per-sample time limit, s.

    Returns
    -------
    dict
        ``{"samples": [...], "summary": {...}}`` (also written to ``OUT/validate.json``).
    """
    if seeds < 1 or jobs < 1:
        raise NvmriError(f"--seeds and --jobs must be >= 1 (got {seeds}, {jobs})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truths = [draw_sample(s) for s in range(start, start + seeds)]
    command = nvmri_command()
    print(f"validate: {seeds} samples, {jobs} at once, in {out}/", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_sample, t, out, timeout_s, command) for t in truths]
        try:
            for future in as_completed(futures):
                results.append(future.result())
                _progress(len(results), seeds, results[-1])
        except KeyboardInterrupt:
            _interrupt(futures)
            raise
    results.sort(key=lambda r: r["seed"])
    result = {"samples": results, "summary": summarise(results)}
    (out / "validate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if as_json else table(results, result["summary"]))
    return result
